"""The per-layer engine: calibrate -> method -> apply for each decoder layer, in memory or streaming.

* :mod:`~llmprune.engine.step`: the per-layer step both loops share (:func:`~llmprune.engine.step.prune_layer`).
* :mod:`~llmprune.engine.layerwise`: the in-memory loop over a loaded model.
* :mod:`~llmprune.engine.streaming`: whether to stream, and the streaming entry point; the run itself is in
  :mod:`~llmprune.engine.run` (its calibration steps in :mod:`~llmprune.engine.calibration_phase`), built from
  :mod:`~llmprune.engine.source` (memory-mapped weights), :mod:`~llmprune.engine.plan` (meta-device model,
  output layout), :mod:`~llmprune.engine.activations` (calibration activations),
  :mod:`~llmprune.engine.workdir` (``<output>.partial/``, its lock), :mod:`~llmprune.engine.resume`
  (``state.json``) and :mod:`~llmprune.engine.options`.
"""
