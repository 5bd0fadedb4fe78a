"""Running calibration batches through one layer in lockstep, pausing before chosen modules.

The statistics of a linear can come from the *pruned* earlier linears of the same layer (GPTQ's
"true-sequential" order, module by module) in a single forward pass per layer: every batch's forward runs in
a worker thread of its own, but only one thread runs at any time (a baton passed in batch order, so the
numerics and the order of every accumulation are those of running the batches one after the other). Each
worker pauses at the forward pre-hook of the next watched module; once every batch has reached it, the
caller acts on that module (finishes its statistics, prunes it) and the batches go on through it. When the
last batch leaves the layer, the layer's outputs for every batch are known: the pass that gathered the
statistics also produced the pruned layer's outputs, so no second pass is needed.

Memory: every batch's forward is in flight at once, so the activations alive at a pause (the residual stream
and the input of the paused module, per batch) are held for all batches together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")

_MAIN = -1


class _Aborted(BaseException):
    """Raised inside a paused worker when the run is abandoned (the caller failed or was interrupted)."""


class DivergentPathsError(RuntimeError):
    """The batches of one layer reached the watched modules in different orders (e.g. routed experts), so no
    module can be finished before every batch has used it."""


class Lockstep(Generic[T]):
    """One pass of ``batches`` through a layer, paused before each module of ``modules`` for ``on_module``.

    Args:
        modules: ``{name: module}`` to pause before (each must run at most once per batch).
        batches: one callable per batch; each runs the layer's forward on its batch and returns its output.
        on_module: ``on_module(name)`` runs on the calling thread once every batch has paused before module
            ``name`` (the pre-hooks registered before this pass's, e.g. statistics hooks, have already seen
            every batch's input); when it returns, the batches run through the module. Modules no batch
            reached are never passed to it.
        device: the CUDA device the workers compute on (their current device is per thread); None otherwise.
    """

    def __init__(self, modules: Mapping[str, nn.Module], batches: Sequence[Callable[[], T]],
                 on_module: Callable[[str], None], device: torch.device | None = None) -> None:
        self.modules, self.batches, self.on_module = modules, list(batches), on_module
        self.device = device
        self._lock = threading.Lock()
        # one wake-up signal per party (each batch, then the caller), so passing the baton wakes only the thread
        # that takes it: a shared condition woke every paused worker at every hand-over, and with many batches
        # the wake-ups of the others left the one that had the turn waiting for the interpreter lock
        self._wake = [threading.Event() for _ in range(len(self.batches) + 1)]
        self._abort = False
        self._local = threading.local()
        self._at: list[str | None] = [None] * len(self.batches)  # the module each paused worker waits before
        self._seen: list[set[str]] = [set() for _ in self.batches]
        self._done = [False] * len(self.batches)
        self._results: list[T | None] = [None] * len(self.batches)
        self._error: BaseException | None = None

    @property
    def current_batch(self) -> int:
        """The batch whose forward is running (read from a hook, on that batch's worker thread)."""
        return self._local.index

    def run(self) -> list[T]:
        """Run every batch to the end of the layer; returns their outputs in batch order.

        Raises:
            DivergentPathsError: the batches paused before different modules.
            Whatever a batch's forward or ``on_module`` raised (the other batches are abandoned).
        """
        if not self.batches:
            return []
        handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in self.modules.items()]
        grad = torch.is_grad_enabled()
        workers = [threading.Thread(target=self._work, args=(b, grad), daemon=True, name=f"llmprune-batch-{b}")
                   for b in range(len(self.batches))]
        try:
            for w in workers:
                w.start()
            self._pass_to(0)
            while True:
                self._wait_for_main()
                if self._error is not None:
                    raise self._error
                if all(self._done):
                    break
                waiting = {self._at[b] for b in range(len(self.batches)) if not self._done[b]}
                if len(waiting) != 1 or any(self._done):
                    raise DivergentPathsError(
                        "the calibration batches took different paths through the layer (paused before "
                        f"{sorted(str(w) for w in waiting)}{', some already finished' if any(self._done) else ''})")
                self.on_module(waiting.pop())
                self._pass_to(0)
        finally:
            with self._lock:
                self._abort = True
            for wake in self._wake:
                wake.set()
            for w in workers:
                w.join()
            for h in handles:
                h.remove()
        return list(self._results)  # type: ignore[arg-type]

    # The baton: only the party holding it runs (a batch index, or the caller, ``_MAIN``: the last signal); it
    # hands it on by setting the next party's signal, then waits on its own.

    def _pass_to(self, who: int) -> None:
        self._wake[who].set()

    def _wait_for_main(self) -> None:
        wake = self._wake[_MAIN]
        while not wake.wait(timeout=0.5):  # a timeout so the caller's thread still sees KeyboardInterrupt
            pass
        wake.clear()  # before the caller passes the baton on, so the next signal to it is never lost

    def _next_after(self, b: int) -> int:
        return b + 1 if b + 1 < len(self.batches) else _MAIN

    def _wait_turn(self, b: int) -> None:
        wake = self._wake[b]
        wake.wait()
        wake.clear()  # before this worker passes the baton on, so the next signal to it is never lost
        if self._abort:
            raise _Aborted

    def _hook(self, name: str):
        def hook(module, args):  # runs on a worker thread; must return None
            b = self._local.index
            if name in self._seen[b]:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass of the layer")
            self._seen[b].add(name)
            self._at[b] = name
            self._pass_to(self._next_after(b))
            self._wait_turn(b)

        return hook

    def _work(self, b: int, grad: bool) -> None:
        self._local.index = b
        try:
            self._wait_turn(b)
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with torch.set_grad_enabled(grad):  # grad mode is per thread: the caller's
                self._results[b] = self.batches[b]()
            self._done[b] = True
            self._at[b] = None
            self._pass_to(self._next_after(b))
        except _Aborted:
            return
        except BaseException as exc:  # handed to the caller, which raises it
            with self._lock:
                if self._error is None:
                    self._error = exc
            self._pass_to(_MAIN)
