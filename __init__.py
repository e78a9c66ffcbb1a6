"""toolkit: export Hugging Face causal LMs to ONNX / TensorRT-LLM engines and serve them.

Importing this package must stay cheap: no torch, onnxruntime, optimum or tensorrt_llm here.
"""

__version__ = "0.1.0"
