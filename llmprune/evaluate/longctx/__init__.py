"""Long-context evaluation where the runtime features act: RULER-style synthetic tasks, answers generated.

* :mod:`.tasks` generates ``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``vartrack`` and ``cwe`` samples
  offline and deterministically from a seed (haystack from :mod:`.haystack`, prompts from :mod:`.prompt`).
* :mod:`.runner` generates the answers greedily with each :class:`~.runner.Variant`'s cache (dense, bitmap KV
  cache) or with model-level features attached (gates, activation sparsity), sharing the prompt's prefill
  between caches; :mod:`.scoring` scores them (RULER's ``string_match_all``).
* :mod:`.report` makes the tables, ``eval_results.json`` entries and the model card section;
  :mod:`.task_files` writes the same samples as lm-eval ``generate_until`` tasks.

The package itself imports nothing (``llmprune --help`` stays free of torch); import the submodules.
"""
