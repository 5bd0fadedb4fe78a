"""Pruning: the method registry, the methods (tensors in, mask out), structured surgery, allocation, recovery."""
