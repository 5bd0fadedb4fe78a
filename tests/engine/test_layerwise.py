"""The layer-by-layer driver against a whole-model reference, on several architectures."""

import pytest
import torch
from helpers import TINY_VOCAB, tiny_model

import llmprune
from llmprune.calibration.capture import capture_layer_inputs
from llmprune.calibration.stats import make_accumulator
from llmprune.model.access import decoder_layers, decoder_layers_path, linear_modules, non_layer_modules
from llmprune.prune.registry import method_for_config
from llmprune.sparsity import check_nm

ARCHS = ["llama", "mistral", "qwen2", "opt"]
BATCH_SIZE = 4  # 6 samples -> 2 batches: 4 + 2


def feed(model, ids):
    """Whole-model forwards in the driver's batches, so both sides add the same per-batch fp32 terms in the
    same order: what is compared is the layer-by-layer machinery, not fp32 summation order."""
    for batch in ids.split(BATCH_SIZE):
        model(input_ids=batch, use_cache=False)


@torch.no_grad()
def reference_prune(model, config, ids):
    """Sequential definition: prune layer i using stats from a full-model forward
    in which layers < i are already pruned (no layer-by-layer machinery)."""
    method = method_for_config(config)
    for layer in decoder_layers(model):
        lins = linear_modules(layer)
        accs = {n: {s: make_accumulator(s, m, torch.device("cpu")) for s in method.stats} for n, m in lins.items()}

        def hook_for(a):
            def hook(mod, args, out):
                for acc in a.values():
                    acc.add(args[0])

            return hook

        handles = [m.register_forward_hook(hook_for(accs[n])) for n, m in lins.items()]
        feed(model, ids)
        for h in handles:
            h.remove()
        for n, m in lins.items():
            new_w, _ = method.fn(m.weight.data, {s: a.result() for s, a in accs[n].items()}, config)
            m.weight.data.copy_(new_w)


@torch.no_grad()
def reference_prune_module(model, config, ids):
    """Module-order definition: each linear pruned using stats from a full-model forward in which every
    earlier linear (earlier layers, and the linears before it in its own layer) is already pruned."""
    method = method_for_config(config)
    for layer in decoder_layers(model):
        for mod in linear_modules(layer).values():  # registration order = forward order (q/k/v share an input)
            accs = {s: make_accumulator(s, mod, torch.device("cpu")) for s in method.stats}
            def hook(m, args, out, accs=accs):
                for a in accs.values():
                    a.add(args[0])

            handle = mod.register_forward_hook(hook)
            feed(model, ids)
            handle.remove()
            new_w, _ = method.fn(mod.weight.data, {s: a.result() for s, a in accs.items()}, config)
            mod.weight.data.copy_(new_w)


REFERENCES = {"layer": reference_prune, "module": reference_prune_module}


@pytest.mark.parametrize("sequential", ["layer", "module"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", [llmprune.WandaConfig(sparsity="2:4"), llmprune.SparseGPTConfig(sparsity=0.5, blocksize=32)])
def test_layerwise_equals_whole_model_reference(arch, config, sequential):
    ids = torch.randint(0, TINY_VOCAB, (6, 24), generator=torch.Generator().manual_seed(0))
    a = tiny_model(arch).double()
    b = tiny_model(arch).double()
    report = llmprune.prune(a, config, ids, device="cpu", batch_size=BATCH_SIZE, progress=False,
                            sequential=sequential)
    assert report.sequential == sequential
    REFERENCES[sequential](b, config, ids)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert torch.equal(pa == 0, pb == 0), f"{arch}: masks differ at {na}"
        # Statistics and SparseGPT math run in fp32; the layer-by-layer forward differs only in fp64 round-off.
        rel = ((pa - pb).norm() / pb.norm().clamp_min(1e-12)).item()
        assert rel < 1e-5, f"{arch}: {na} differs by {rel:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_pruned_to_target(arch):
    model = tiny_model(arch)
    head_before = model.get_output_embeddings().weight.clone()
    ids = torch.randint(0, TINY_VOCAB, (4, 16))
    report = llmprune.prune(model, llmprune.WandaConfig(sparsity="2:4"), ids, device="cpu", progress=False)
    layers = decoder_layers(model)
    prefix = decoder_layers_path(model)
    expected = {f"{prefix}.{i}.{n}" for i, layer in enumerate(layers) for n in linear_modules(layer)}
    assert {m.name for m in report.modules} == expected
    for i, layer in enumerate(layers):
        for name, lin in linear_modules(layer).items():
            assert check_nm(lin.weight != 0, 2, 4), f"{arch} layer {i} {name}"
            assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5)
    assert report.overall_sparsity == pytest.approx(0.5)
    # lm_head / embeddings untouched
    assert torch.equal(model.get_output_embeddings().weight, head_before)


def test_ignore_patterns_and_layer_inputs_shapes():
    model = tiny_model("llama")
    ids = torch.randint(0, TINY_VOCAB, (3, 10))
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=2)
    assert len(inputs) == 2 and inputs.hidden[0].shape == (2, 10, 64) and inputs.hidden[1].shape == (1, 10, 64)
    assert "position_embeddings" in inputs.kwargs[0]
    cfg = llmprune.MagnitudeConfig(sparsity=0.5, ignore=["mlp.down_proj", "*.1.self_attn.*"])
    report = llmprune.prune(model, cfg, device="cpu", progress=False)
    names = {m.name for m in report.modules}
    assert not any("down_proj" in n for n in names)
    assert not any(".1.self_attn." in n for n in names)
    assert "model.layers.0.self_attn.q_proj" in names
    assert (decoder_layers(model)[0].mlp.down_proj.weight != 0).all()


def test_capture_restores_devices_and_model_unchanged_by_capture():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture_layer_inputs(model, torch.randint(0, TINY_VOCAB, (2, 8)), torch.device("cpu"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert non_layer_modules(model)  # embeddings, norm, rotary, head


def test_multi_stage_prune():
    model = tiny_model("llama")
    ids = torch.randint(0, TINY_VOCAB, (4, 16))
    stages = [llmprune.WandaConfig(sparsity=0.25), llmprune.SparseGPTConfig(sparsity="2:4", blocksize=32)]
    report = llmprune.prune(model, stages, ids, device="cpu", progress=False)
    assert len(report.modules) == 2 * 7 * 2
    for layer in decoder_layers(model):
        for lin in linear_modules(layer).values():
            assert check_nm(lin.weight != 0, 2, 4)


def test_calibration_required():
    with pytest.raises(llmprune.ConfigError, match="needs calibration"):
        llmprune.prune(tiny_model("llama"), llmprune.WandaConfig(), None, device="cpu", progress=False)
