"""Matrix entropy (UNComp) of hand-built matrices, and the per-layer / per-KV-head scores of a model."""

import math

import pytest
import torch
from helpers import tiny_llama

from llmprune.calibration.entropy import (
    InputMoments,
    effective_rank,
    head_grams,
    kv_entropy_scores,
    matrix_entropy,
    spectrum_entropy,
)


def test_rank_one_is_zero_and_isotropic_is_log_d():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 16, generator=g)
    a = torch.randn(50, 1, generator=g)
    assert matrix_entropy(a @ v) == pytest.approx(0.0, abs=1e-9)
    assert effective_rank(a @ v) == pytest.approx(1.0, abs=1e-9)
    assert matrix_entropy(torch.eye(16)) == pytest.approx(math.log(16), abs=1e-12)
    assert matrix_entropy(3.0 * torch.eye(16)) == pytest.approx(math.log(16), abs=1e-12)  # scale-free
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert matrix_entropy(q) == pytest.approx(math.log(16), abs=1e-9)  # any orthonormal basis: basis-free
    assert effective_rank(q) == pytest.approx(16.0, abs=1e-7)


def test_exact_values_and_ordering():
    # second moment diag(2, 1, 1): p = (1/2, 1/4, 1/4) -> H = 1.5 log 2
    x = torch.diag(torch.tensor([math.sqrt(2.0), 1.0, 1.0], dtype=torch.float64)) * math.sqrt(3.0)
    assert matrix_entropy(x) == pytest.approx(1.5 * math.log(2.0), abs=1e-12)
    # two equal directions out of 8: log 2
    y = torch.zeros(2, 8)
    y[0, 0] = y[1, 5] = 1.0
    assert matrix_entropy(y) == pytest.approx(math.log(2.0), abs=1e-12)
    g = torch.Generator().manual_seed(1)
    low = torch.randn(200, 32, generator=g) * torch.logspace(0, -3, 32)  # decaying spectrum
    high = torch.randn(200, 32, generator=g)
    assert 0 < matrix_entropy(low) < matrix_entropy(high) < math.log(32)
    assert float(spectrum_entropy(torch.zeros(4, 4))) == 0.0
    with pytest.raises(ValueError):
        matrix_entropy(torch.zeros(2, 3, 4))


def test_head_grams_from_input_moments_equal_output_moments():
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(12, 3 * 4, bias=True).double()
    x = torch.randn(5, 7, 12, generator=g, dtype=torch.float64)
    acc = InputMoments(12, torch.device("cpu"))
    acc.add(x[:2])
    acc.add(x[2:])
    grams = head_grams(lin.weight, acc.gram, acc.sum, acc.count, 4, lin.bias)
    y = lin(x).detach().reshape(-1, 3, 4).double()
    want = torch.einsum("nhi,nhj->hij", y, y) / y.shape[0]
    torch.testing.assert_close(grams, want, rtol=1e-10, atol=1e-10)


def test_kv_entropy_scores_per_layer_and_head():
    model = tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(3))
    ent = kv_entropy_scores(model, ids, torch.device("cpu"), batch_size=2)
    assert ent.head_dim == 16 and len(ent.k) == len(ent.v) == 2 and all(len(r) == 2 for r in ent.k + ent.v)
    assert all(0 <= e <= math.log(16) + 1e-9 for r in ent.k + ent.v for e in r)
    # layer 0 values by hand: v_proj outputs of the captured layer-0 inputs (post input-norm)
    store = {}
    attn = model.model.layers[0].self_attn
    h = attn.v_proj.register_forward_hook(lambda m, a, o: store.setdefault("v", []).append(o.detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    v = torch.cat(store["v"]).reshape(-1, 2, 16)
    for head in range(2):
        assert ent.v[0][head] == pytest.approx(matrix_entropy(v[:, head]), abs=1e-6)


def test_coordinate_entropy():
    from llmprune.calibration.entropy import coordinate_entropy

    assert float(coordinate_entropy(torch.eye(8))) == pytest.approx(math.log(8))
    g = torch.diag(torch.tensor([2.0, 1.0, 1.0, 0.0]))
    assert float(coordinate_entropy(g)) == pytest.approx(1.5 * math.log(2.0))
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rank1 = q[:, :1] @ q[:, :1].T  # one direction, spread over the coordinates
    assert float(spectrum_entropy(rank1)) == pytest.approx(0.0, abs=1e-9)
    assert float(coordinate_entropy(rank1)) > 0.5
