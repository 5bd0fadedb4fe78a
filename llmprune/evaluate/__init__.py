"""Evaluation: perplexity (plain and with the pruned KV cache), lm-eval, speed/memory bench, results store."""
