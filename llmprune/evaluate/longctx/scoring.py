"""Scoring of the long-context tasks: RULER's ``string_match_all`` (every task here uses it).

A prediction is cleaned as RULER's ``postprocess_pred`` does (stripped; control characters become newlines), and
scores the fraction of the reference strings found in it, case-insensitively: 1 or 0 for one reference (niah
single / multikey), partial credit for several (multivalue's 4 values, vartrack's 5 names, cwe's 10 words).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` that occur in ``prediction`` (case-insensitive), in [0, 1].

    Raises:
        ValueError: with no references.
    """
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = clean(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)
