"""Recovery that keeps the sparsity pattern: block-wise reconstruction (fixed or learned N:M mask) and
end-to-end distillation from the dense model.

Pure functions over modules and tensors: the engine (:mod:`llmprune.engine.step`) feeds them the decoder
block, its calibration inputs and the dense block's outputs; nothing here loops over datasets or picks a device.
"""
