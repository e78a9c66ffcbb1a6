"""Engines behind the runtime's ``Engine`` protocol: onnxruntime and TensorRT-LLM."""
