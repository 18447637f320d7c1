"""Reference PyTorch runtime: Llama-family forward, KV cache, generation, model loading."""
