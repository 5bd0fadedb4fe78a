"""The per-layer engine: calibrate -> method -> apply for each decoder layer, in memory or streaming."""
