"""Modules of ``benchmarks/llama_cpp_peer.py``: build llama.cpp, start both servers, measure, render."""
