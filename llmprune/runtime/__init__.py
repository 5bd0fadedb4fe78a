"""Inference-time features: packed 2:4 linears, the bitmap KV cache, learned attention gates."""
