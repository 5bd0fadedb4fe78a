import pytest
import torch

from llmprune.errors import ConfigError
from llmprune.sparsity import (
    SparsityPattern,
    check_nm,
    nm_mask,
    per_row_mask,
    sparsity_of,
    tensor_mask,
    top_indices,
)


@pytest.mark.parametrize(
    "text,ratio,n,m",
    [("2:4", 0.5, 2, 4), ("4:8", 0.5, 4, 8), ("1:4", 0.75, 1, 4), ("0.5", 0.5, None, None), (0.3, 0.3, None, None)],
)
def test_parse_valid(text, ratio, n, m):
    p = SparsityPattern.parse(text)
    assert p.ratio == pytest.approx(ratio) and p.n == n and p.m == m


@pytest.mark.parametrize("bad", ["3:2", "0:4", "4:4", "0", "1", "1.2", "-0.1", "abc", "", "nan", 124, True])
def test_parse_invalid(bad):
    with pytest.raises(ConfigError):
        SparsityPattern.parse(bad)


def test_yaml_sexagesimal_hint():
    with pytest.raises(ConfigError, match="quote"):
        SparsityPattern.parse(124)  # what PyYAML makes of an unquoted 2:4


def test_nm_mask_exact():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    expected = torch.tensor([[True, False, True, False, False, True, True, False]])
    assert torch.equal(nm_mask(score, 2, 4), expected)
    assert torch.equal(nm_mask(score, 1, 4), torch.tensor([[True, False, False, False, False, True, False, False]]))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (3, 8), (5, 16)])
def test_nm_mask_keeps_the_highest_of_each_group(n, m):
    score = torch.randn(13, 5 * m)  # distinct values: the top n of a group are unambiguous
    groups, keep = score.reshape(13, 5, m), nm_mask(score, n, m).reshape(13, 5, m)
    assert (keep.sum(-1) == n).all()
    lowest_kept = groups.masked_fill(~keep, float("inf")).amin(-1)
    highest_dropped = groups.masked_fill(keep, float("-inf")).amax(-1)
    assert (lowest_kept > highest_dropped).all()


def test_nm_mask_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_per_row_mask_exact():
    score = torch.tensor([[5.0, 1.0, 4.0, 2.0], [0.0, 9.0, 8.0, 7.0]])
    expected = torch.tensor([[True, False, True, False], [False, True, True, False]])
    assert torch.equal(per_row_mask(score, 0.5), expected)


def test_tensor_mask_exact():
    score = torch.tensor([[5.0, 1.0], [4.0, 2.0]])
    assert torch.equal(tensor_mask(score, 0.5), torch.tensor([[True, False], [True, False]]))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_invariants_random(n, m):
    score = torch.rand(37, 8 * m)
    mask = nm_mask(score, n, m)
    assert check_nm(mask, n, m)
    assert (mask.reshape(37, -1, m).sum(-1) == n).all()
    w = score * mask
    assert sparsity_of(w) == pytest.approx(1 - n / m)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.7])
def test_per_row_achieved_sparsity(ratio):
    score = torch.rand(19, 200)
    mask = per_row_mask(score, ratio)
    assert ((~mask).sum(1) == int(200 * ratio)).all()


def test_check_nm_detects_violation():
    mask = torch.tensor([[True, True, True, False]])
    assert not check_nm(mask, 2, 4)
    assert check_nm(mask, 3, 4)


def test_top_indices_exact_ties_and_bounds():
    assert top_indices(torch.tensor([0.1, 3.0, 2.0, 0.5]), 2).tolist() == [1, 2]
    # ties: the lower index wins; the result is sorted ascending
    assert top_indices(torch.tensor([1.0, 5.0, 1.0, 1.0]), 2).tolist() == [0, 1]
    assert top_indices(torch.tensor([1.0, 5.0, 1.0]), 3).tolist() == [0, 1, 2]
    for k in (0, 4):
        with pytest.raises(ConfigError, match="cannot keep"):
            top_indices(torch.tensor([1.0, 5.0, 1.0]), k)
