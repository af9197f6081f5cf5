"""Backends: one loaded model on one device. `llama_cpp` (GGUF) is imported lazily."""
