"""Model access: decoder layers and linears of HF causal LMs, loading, devices, per-layer-size model types."""
