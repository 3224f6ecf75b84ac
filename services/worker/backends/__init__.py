"""Backends by name. Each is imported only when chosen, so a CPU machine never
imports tensorrt_llm and a GPU image need not build llama.cpp."""
