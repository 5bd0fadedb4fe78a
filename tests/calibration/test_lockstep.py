"""Lockstep passes: batches pause before each watched module until all reached it, one thread at a time."""

import threading
import time

import pytest
import torch
from torch import nn

from llmprune.calibration.lockstep import DivergentPathsError, Lockstep


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))


def _batches(model, n=3):
    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    return xs, [lambda x=x: model(x) for x in xs]


def test_outputs_equal_plain_runs_when_nothing_changes():
    model = _chain()
    xs, batches = _batches(model)
    seen = []
    with torch.no_grad():
        out = Lockstep({"0": model[0], "2": model[2]}, batches, seen.append).run()
        for x, o in zip(xs, out):
            assert torch.equal(o, model(x))
    assert seen == ["0", "2"]


def test_every_batch_pauses_before_the_module_is_changed():
    model = _chain()
    xs, batches = _batches(model, n=4)
    arrived = {"0": 0, "2": 0}
    for name in arrived:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: arrived.__setitem__(n, arrived[n] + 1))
    at_call = {}

    def on_module(name):
        at_call[name] = dict(arrived)
        if name == "2":  # every batch goes through the changed module
            model[2].weight.zero_()
            model[2].bias.fill_(1.5)

    with torch.no_grad():
        out = Lockstep({"0": model[0], "2": model[2]}, batches, on_module).run()
    assert at_call == {"0": {"0": 4, "2": 0}, "2": {"0": 4, "2": 4}}
    for o in out:
        assert torch.equal(o, torch.full((2, 3), 1.5))


def test_one_thread_runs_at_a_time_in_batch_order():
    model = _chain()
    order, active, most = [], [0], [0]

    def busy(module, args, out):  # runs between two pauses; a second thread here would overlap the sleep
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.01)
        active[0] -= 1

    model[0].register_forward_hook(busy)

    def make(i, x):
        def run():
            order.append(i)
            y = model[0](x)
            order.append(i)
            return model[2](y)

        return run

    xs, _ = _batches(model)
    with torch.no_grad():
        Lockstep({"0": model[0], "2": model[2]}, [make(i, x) for i, x in enumerate(xs)], lambda n: None).run()
    assert order == [0, 1, 2, 0, 1, 2]
    assert most[0] == 1


def test_a_failing_batch_is_raised_and_no_worker_is_left():
    model = _chain()
    xs, batches = _batches(model)

    def bad():
        model[0](xs[1])
        raise ValueError("boom")

    before = threading.active_count()
    with pytest.raises(ValueError, match="boom"), torch.no_grad():
        Lockstep({"0": model[0], "2": model[2]}, [batches[0], bad, batches[2]], lambda n: None).run()
    assert threading.active_count() == before


def test_a_failing_callback_is_raised_and_no_worker_is_left():
    model = _chain()
    _, batches = _batches(model)

    def on_module(name):
        raise KeyError(name)

    before = threading.active_count()
    with pytest.raises(KeyError), torch.no_grad():
        Lockstep({"0": model[0], "2": model[2]}, batches, on_module).run()
    assert threading.active_count() == before
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks


def test_divergent_paths_are_refused():
    model = _chain()
    xs, _ = _batches(model, n=2)
    skip = [lambda: model[2](model[0](xs[0])), lambda: model[2](xs[1][:, :4] @ torch.ones(4, 4))]
    with pytest.raises(DivergentPathsError), torch.no_grad():
        Lockstep({"0": model[0], "2": model[2]}, skip, lambda n: None).run()


def test_a_module_run_twice_is_refused():
    model = _chain()
    xs, _ = _batches(model, n=1)
    with pytest.raises(RuntimeError, match="ran twice"), torch.no_grad():
        Lockstep({"0": model[0]}, [lambda: model[0](model[0](xs[0]))], lambda n: None).run()


def test_the_callers_grad_mode_holds_in_the_workers():
    model = _chain()
    _, batches = _batches(model, n=2)
    with torch.no_grad():
        out = Lockstep({"0": model[0]}, batches, lambda n: None).run()
    assert not any(o.requires_grad for o in out)
    out = Lockstep({"0": model[0]}, batches, lambda n: None).run()
    assert all(o.requires_grad for o in out)


def test_no_batches():
    assert Lockstep({}, [], lambda n: None).run() == []
