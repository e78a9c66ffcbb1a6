"""toolkit.artifact: the engine-directory contract shared by export (writes it) and runtime (reads it).

``manifest``: ``toolkit.json`` (what was built, file sizes and hashes, validation), staging and publish;
``layout``: the artifact's file names and the KV cache layout of an exported graph;
``onnx_session``: onnxruntime session creation; ``trtllm``: the lazy TensorRT-LLM import and its
engine ``config.json``. Nothing here imports export/, runtime/ or server/, nor a heavy library at
import time.
"""
