"""RULER-style synthetic long-context tasks, generated offline and deterministically from a seed.

After RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?"),
templates and metrics as in its ``synthetic.yaml`` / lm-eval's ``ruler`` tasks:

* ``niah_single``: one needle ``One of the special magic numbers for KEY is: VALUE.`` in the haystack; asked for
  VALUE (a 7-digit number).
* ``niah_multikey``: four needles with different keys; asked for the value of one of them.
* ``niah_multivalue``: four needles with the same key and different values; asked for all four.
* ``vartrack``: a chain ``VAR A = 12345.``, ``VAR B = VAR A.`` ... (4 hops) spread through the haystack; asked
  for every variable holding the value.
* ``cwe``: a numbered list of words, 10 of them 30 times each, the others 3 times (more when the built-in word
  list runs short; always fewer than 30); asked for the 10 most common.

Each prompt fills ``context - max_new_tokens`` tokens (the haystack, or the word list, is grown to the largest
size that fits). Needle depth sweep: sample ``i`` puts its (first) needle at depth ``(i % 11) / 10`` of the
haystack tokens; other needles go to seeded random depths (the vartrack chain after the first, in order). Sample
``i`` depends only on ``(seed, task, context, i)``, so a larger ``--samples`` extends a smaller run. Differences
from RULER: no few-shot example for vartrack / cwe, shorter generation budgets (:data:`MAX_NEW_TOKENS`) to fit
CPU decoding, needle keys are two words of a built-in list.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from llmprune.errors import ConfigError
from llmprune.evaluate.longctx.haystack import Haystack
from llmprune.evaluate.longctx.prompt import build_prompt, count_tokens
from llmprune.evaluate.longctx.words import WORDS

_NIAH = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
         "you about the numbers afterwards.\n{context}\nWhat are all the special magic numbers for {query} "
         "mentioned in the provided text?")
_NIAH_PREFIX = " The special magic numbers for {query} mentioned in the provided text are"
_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
       "Question: Find all variables that are assigned the value {query} in the text above.")
_VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
              "assigned the value {query}, they are:")
_CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

#: Tokens generated per task (RULER: 128 for niah, 30 for vartrack, 120 for cwe); the answers fit.
MAX_NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 48, "vartrack": 30, "cwe": 64}
TASK_NAMES = tuple(MAX_NEW_TOKENS)
DEPTHS = 11  # depth sweep points 0, 0.1, ..., 1
CWE_COMMON, CWE_COMMON_FREQ, CWE_RARE_FREQ = 10, 30, 3


@dataclass
class LongSample:
    """One generated example.

    Attributes:
        task, context, index: which example (``context``: the target length in tokens, generation included).
        input: the user message (task text with the haystack); ``answer_prefix`` starts the answer.
        outputs: the reference strings (all must appear in the answer for full credit).
        max_new_tokens: the generation budget.
        depth: where the (first) needle sits, as a fraction of the haystack tokens (None for cwe).
        prompt: what the model is given (chat template applied when ``chat``); ``n_tokens`` its length.
    """

    task: str
    context: int
    index: int
    input: str
    answer_prefix: str
    outputs: list[str]
    max_new_tokens: int
    depth: float | None
    prompt: str
    n_tokens: int
    chat: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Parts:
    template: str  # with {context}
    answer_prefix: str
    outputs: list[str]
    needles: list[str]
    depths: list[float]


def _key(rng: random.Random) -> str:
    return "-".join(rng.sample(WORDS, 2))


def _niah(n_keys: int, n_values: int) -> Callable[[random.Random, float], _Parts]:
    def build(rng: random.Random, depth: float) -> _Parts:
        keys = []
        while len(keys) < n_keys:
            k = _key(rng)
            if k not in keys:
                keys.append(k)
        values = [[str(v) for v in rng.sample(range(10**6, 10**7), n_values)] for _ in keys]
        needles = [_NEEDLE.format(key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        depths = [depth] + [rng.random() for _ in needles[1:]]
        return _Parts(_NIAH.replace("{query}", keys[0]), _NIAH_PREFIX.format(query=keys[0]), values[0],
                      needles, depths)

    return build


def _vartrack(rng: random.Random, depth: float, hops: int = 4) -> _Parts:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in range(hops))
    return _Parts(_VT.replace("{query}", value), _VT_PREFIX.format(n=len(names), query=value), names, needles, depths)


_HAYSTACK_TASKS = {
    "niah_single": _niah(1, 1),
    "niah_multikey": _niah(4, 1),
    "niah_multivalue": _niah(1, 4),
    "vartrack": _vartrack,
}


def insert_needles(chunks: Sequence[tuple[str, int]], needles: Sequence[str], depths: Sequence[float]) -> str:
    """The haystack text with each needle before the chunk boundary nearest ``depth`` x the haystack tokens.

    Needles at the same boundary keep their order (so a vartrack chain stays in order).
    """
    before = [0]
    for _, t in chunks:
        before.append(before[-1] + t)
    total = before[-1]
    at: dict[int, list[str]] = {}
    for needle, d in zip(needles, depths):
        target = d * total
        i = bisect.bisect_left(before, target)
        if i > 0 and (i == len(before) or target - before[i - 1] <= before[i] - target):
            i -= 1
        at.setdefault(i, []).append(needle)
    pieces = []
    for i in range(len(chunks) + 1):
        pieces += at.get(i, [])
        if i < len(chunks):
            pieces.append(chunks[i][0])
    return " ".join(pieces)


def _too_short(task: str, context: int) -> ConfigError:
    return ConfigError(f"--context {context} is too short for {task} (the task text and its answer do not fit)")


def _fit_haystack(task: str, parts: _Parts, haystack: Haystack, tokenizer, budget: int, start: int, chat: bool,
                  context: int) -> tuple[str, str, int]:
    """The largest haystack with the needles that fits ``budget`` prompt tokens: ``(input, prompt, tokens)``."""
    def render(chunks):
        text = parts.template.replace("{context}", insert_needles(chunks, parts.needles, parts.depths))
        prompt = build_prompt(tokenizer, text, parts.answer_prefix, chat)
        return text, prompt, count_tokens(tokenizer, prompt)

    overhead = render([])[2]
    if overhead >= budget:
        raise _too_short(task, context)
    chunks = haystack.take(tokenizer, budget - overhead, start)
    while chunks:
        text, prompt, n = render(chunks)
        if n <= budget:
            return text, prompt, n
        excess = n - budget  # per-chunk counts are estimates: drop chunks worth the excess and retry
        while chunks and excess > 0:
            excess -= chunks.pop()[1]
    raise _too_short(task, context)


def _cwe(rng: random.Random, n_entries: int) -> tuple[str, list[str]]:
    words = list(WORDS)
    rng.shuffle(words)
    common, rare = words[:CWE_COMMON], words[CWE_COMMON:]
    slots = n_entries - CWE_COMMON * CWE_COMMON_FREQ
    n_rare = min(len(rare), math.ceil(slots / CWE_RARE_FREQ))
    entries = common * CWE_COMMON_FREQ + (rare[:n_rare] * CWE_COMMON_FREQ)[:slots]
    rng.shuffle(entries)
    return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), common


def _fit_cwe(seed: str, tokenizer, budget: int, chat: bool, context: int) -> tuple[str, str, int, list[str]]:
    """The longest word list that fits ``budget`` prompt tokens (binary search on its length)."""
    def render(n):
        words, common = _cwe(random.Random(seed), n)
        text = _CWE.replace("{context}", words)
        prompt = build_prompt(tokenizer, text, _CWE_PREFIX, chat)
        return text, prompt, count_tokens(tokenizer, prompt), common

    lo = CWE_COMMON * CWE_COMMON_FREQ + 1
    max_rare = (len(WORDS) - CWE_COMMON) * (CWE_COMMON_FREQ - 1)
    hi = min(lo + max_rare, budget)
    best = render(lo) if lo <= hi else None
    if best is None or best[2] > budget:
        raise _too_short("cwe", context)
    lo += 1
    while lo <= hi:
        mid = (lo + hi) // 2
        got = render(mid)
        if got[2] <= budget:
            best, lo = got, mid + 1
        else:
            hi = mid - 1
    if best[2] < budget // 2:  # the built-in word list ran out
        raise ConfigError(f"--context {context} is too long for cwe (its word list fills {best[2]} of {budget} tokens)")
    return best


def check_contexts(config, contexts: Sequence[int]) -> None:
    """Every context length fits the model (``max_position_embeddings`` of its text config, when it has one).

    Raises:
        ConfigError: naming the length and the model's maximum.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    for c in contexts:
        if limit is not None and c > limit:
            raise ConfigError(f"--context {c} is larger than the model's maximum context ({limit} tokens)")


def make_sample(task: str, context: int, index: int, tokenizer, haystack: Haystack, seed: int = 0,
                chat: bool = False) -> LongSample:
    """Example ``index`` of ``task`` at ``context`` tokens; the same for the same arguments, on any machine.

    Raises:
        ConfigError: an unknown task, or a context too short (or too long, for cwe) for the task.
    """
    if task not in MAX_NEW_TOKENS:
        raise ConfigError(f"unknown long-context task {task!r} (known: {', '.join(TASK_NAMES)})")
    max_new = MAX_NEW_TOKENS[task]
    budget = context - max_new
    tag = f"llmprune-longctx:{seed}:{task}:{context}:{index}"
    if task == "cwe":
        text, prompt, n, common = _fit_cwe(tag, tokenizer, budget, chat, context)
        return LongSample(task, context, index, text, _CWE_PREFIX, common, max_new, None, prompt, n, chat)
    rng = random.Random(tag)
    depth = (index % DEPTHS) / (DEPTHS - 1)
    parts = _HAYSTACK_TASKS[task](rng, depth)
    start = rng.randrange(len(haystack.chunks))
    text, prompt, n = _fit_haystack(task, parts, haystack, tokenizer, budget, start, chat, context)
    return LongSample(task, context, index, text, parts.answer_prefix, parts.outputs, max_new, depth, prompt, n, chat)


def make_samples(tasks: Sequence[str], contexts: Sequence[int], n: int, tokenizer, haystack: Haystack,
                 seed: int = 0, chat: bool = False) -> list[LongSample]:
    """``n`` examples of every task at every context length (task-major, then length, then index)."""
    return [make_sample(t, c, i, tokenizer, haystack, seed, chat) for t in tasks for c in contexts for i in range(n)]
