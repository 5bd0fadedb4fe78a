"""The haystack of the long-context tasks: sentences of a local corpus (C4 parquet, a text file) or RULER's noise.

A :class:`Haystack` is a list of text chunks (sentences). :meth:`Haystack.take` returns consecutive chunks
(wrapping around) from a start chunk whose token counts add up to at most a budget; each sample of a task starts
at its own seeded chunk, so samples see different text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmprune.errors import ConfigError
from llmprune.evaluate.longctx.words import FILLER

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
#: Longer chunks are cut at word boundaries (keeps needle depths precise in corpora with long lines).
_MAX_CHUNK_CHARS = 400


def _split(text: str) -> list[str]:
    out = []
    for sentence in _SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        while len(sentence) > _MAX_CHUNK_CHARS:
            cut = sentence.rfind(" ", 0, _MAX_CHUNK_CHARS)
            cut = cut if cut > 0 else _MAX_CHUNK_CHARS
            out.append(sentence[:cut])
            sentence = sentence[cut:].strip()
        if sentence:
            out.append(sentence)
    return out


def _read_texts(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise ConfigError(f"--haystack {path}: cannot read parquet ({type(exc).__name__}: {exc})") from None
        if "text" not in table.column_names:
            raise ConfigError(f"--haystack {path}: no 'text' column (columns: {', '.join(table.column_names)})")
        return [t for t in table.column("text").to_pylist() if t]
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--haystack {path}: cannot read as UTF-8 text ({exc})") from None


@dataclass
class Haystack:
    """Text chunks to fill a context with.

    Attributes:
        chunks: sentences, in corpus order.
        source: where they came from (a path, or ``"filler"``), recorded with results.
    """

    chunks: list[str]
    source: str
    _tokens: dict[int, int] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> Haystack:
        """The sentences of a ``.parquet`` (column ``text``) or text file, or RULER's noise when ``path`` is None.

        Raises:
            ConfigError: a missing or unreadable file, or one without text.
        """
        if path is None:
            return cls(_split(FILLER), "filler")
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"--haystack {path}: no such file")
        chunks = [c for text in _read_texts(p) for c in _split(text)]
        if not chunks:
            raise ConfigError(f"--haystack {path}: no text in it")
        return cls(chunks, str(p))

    def tokens(self, tokenizer, i: int) -> int:
        """Tokens of chunk ``i`` as it appears in a haystack (after a space), cached."""
        n = self._tokens.get(i)
        if n is None:
            # at least 1, so a tokenizer that drops a chunk cannot make take() loop forever
            n = max(1, len(tokenizer(" " + self.chunks[i], add_special_tokens=False).input_ids))
            self._tokens[i] = n
        return n

    def take(self, tokenizer, budget: int, start: int) -> list[tuple[str, int]]:
        """``(chunk, tokens)`` pairs from chunk ``start`` on (wrapping around) adding up to at most ``budget``."""
        out: list[tuple[str, int]] = []
        total, n = 0, len(self.chunks)
        i = start % n
        while True:
            t = self.tokens(tokenizer, i)
            if total + t > budget:
                return out
            out.append((self.chunks[i], t))
            total += t
            i = (i + 1) % n
