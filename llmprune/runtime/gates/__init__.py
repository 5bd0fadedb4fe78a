"""Learned block-sparse attention gates (SeerAttention-style): the gate, its runtime and its training."""
