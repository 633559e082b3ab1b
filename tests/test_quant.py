"""Quantization and joint sparsity + quantization: grids, GPTQ vs round-to-nearest, the joint sweep."""

from __future__ import annotations

import pytest
import torch
from test_solvers import correlated_layer, reference_sparsegpt

from llmprune.bitpack import pack_int32, unpack_int32
from llmprune.pattern import Pattern, n_pruned
from llmprune.quant import QuantSpec, codes, dequantize, find_params, layer_params, on_grid, rtn
from llmprune.solvers import magnitude, round_to_nearest, sparsegpt, wanda
from llmprune.solvers.result import relative_error


def test_hand_computed_grid():
    """2 bits asymmetric on [-1, 0, 0.5, 2]: scale 1, zero 1; 0.5 rounds half to even (to 0)."""
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scale, zero = find_params(x, QuantSpec(2, sym=False))
    assert scale.tolist() == [1.0] and zero.tolist() == [1.0]
    p = layer_params(x, QuantSpec(2, sym=False))
    assert codes(x, p).tolist() == [[0, 1, 1, 3]]
    assert rtn(x, QuantSpec(2, sym=False))[0].tolist() == [[-1.0, 0.0, 0.0, 2.0]]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("search", ["minmax", "mse"])
@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
def test_grid_contains_zero_and_codes_round_trip(sym, search, wbits):
    W = torch.randn(24, 64) * torch.exp(torch.randn(24, 1))
    W[:, ::3] = 0  # pruned weights
    spec = QuantSpec(wbits, 16, sym, search)
    Wq, p = rtn(W, spec)
    assert torch.all(Wq[:, ::3] == 0)
    c = codes(Wq, p)
    assert int(c.max()) <= spec.maxq
    scale, zero = p.columns(64)
    assert torch.equal(dequantize(c.float(), scale, zero), Wq)


def test_mse_search_never_worse_than_minmax():
    x = torch.randn(64, 128)
    x[:, 0] *= 8  # an outlier per row: clipping it buys finer steps for the rest
    errs = {}
    for search in ("minmax", "mse"):
        spec = QuantSpec(3, -1, True, search)
        errs[search] = float((rtn(x, spec)[0] - x).pow(2).sum())
    assert errs["mse"] < errs["minmax"]


@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sparsity,pattern", [(0.0, None), (0.5, None), (0.5, Pattern(2, 4))])
def test_joint_sweep_matches_plain_algorithm(group_size, sparsity, pattern):
    W, H = correlated_layer(40, 128)
    spec = QuantSpec(4, group_size)
    got = sparsegpt(W, H, sparsity, pattern, spec, block_size=64)
    ref = reference_sparsegpt(W, H, sparsity, pattern, block_size=64, quant=spec)
    if group_size == -1:  # grids fixed up front: the same weights to fp32 rounding
        torch.testing.assert_close(got.weight, ref, rtol=1e-4, atol=1e-4)
    else:
        # grids chosen from updated weights move with the last bits of two fp32 summation orders, so a weight
        # at a half step may round the other way and the sweep continues from there: few weights differ,
        # and the layer error is the same
        assert ((got.weight - ref).abs() > 1e-4).float().mean() < 0.06
        e_got, e_ref = relative_error(W, got.weight, H), relative_error(W, ref, H)
        assert abs(e_got - e_ref) < 0.05 * e_ref
    assert on_grid(got.weight, got.quant)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("sym", [True, False])
def test_joint_output_on_grid_zeros_exact(act_order, group_size, sym):
    W, H = correlated_layer(37, 96)
    spec = QuantSpec(4, group_size, sym)
    res = sparsegpt(W, H, 0.5, None, spec, block_size=32, act_order=act_order)
    assert on_grid(res.weight, res.quant)
    assert int(res.mask.sum()) == n_pruned(0.5, W.numel())
    assert torch.all(res.weight[res.mask] == 0)


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(4, 8)])
def test_nm_pattern_survives_quantization(pattern):
    W, H = correlated_layer(33, 128)
    res = sparsegpt(W, H, pattern.sparsity, pattern, QuantSpec(3, 64), block_size=64)
    kept = (res.weight != 0).reshape(33, -1, pattern.m).sum(-1)
    assert torch.all(kept <= pattern.n)  # a kept weight may also round to 0
    assert torch.equal(res.mask.reshape(33, -1, pattern.m).sum(-1), torch.full_like(kept, pattern.m - pattern.n))
    assert on_grid(res.weight, res.quant)


@pytest.mark.parametrize("wbits", [4, 3])
@pytest.mark.parametrize("group_size", [-1, 64])
def test_gptq_beats_round_to_nearest(wbits, group_size):
    W, H = correlated_layer(96, 256)
    spec = QuantSpec(wbits, group_size)
    gptq = relative_error(W, sparsegpt(W, H, 0.0, None, spec).weight, H)
    gptq_ao = relative_error(W, sparsegpt(W, H, 0.0, None, spec, act_order=True).weight, H)
    base = relative_error(W, round_to_nearest(W, H, 0.0, None, spec).weight, H)
    assert gptq < base and gptq_ao < base, (gptq, gptq_ao, base)


@pytest.mark.parametrize("pattern", [None, Pattern(2, 4)])
def test_joint_beats_prune_then_round(pattern):
    W, H = correlated_layer(96, 256)
    spec = QuantSpec(4, 64)
    joint = relative_error(W, sparsegpt(W, H, 0.5, pattern, spec).weight, H)
    for solver in (magnitude, wanda):
        two_step = relative_error(W, solver(W, H, 0.5, pattern, spec).weight, H)
        assert joint < two_step, (solver.__name__, joint, two_step)


def test_identity_hessian_gptq_is_round_to_nearest():
    W = torch.randn(16, 128)
    for spec in (QuantSpec(4, -1), QuantSpec(3, 32, sym=False)):
        assert torch.equal(sparsegpt(W, torch.eye(128), 0.0, None, spec).weight, rtn(W, spec)[0])


def test_quant_share_splits_the_error():
    """Joint: the rounding steps' share of the OBS losses grows with fewer bits, and is all of it for GPTQ."""
    W, H = correlated_layer(48, 128)
    shares = [sparsegpt(W, H, 0.5, None, QuantSpec(b, 32)).quant_share for b in (8, 4, 3)]
    assert 0 < shares[0] < shares[1] < shares[2] < 1
    assert sparsegpt(W, H, 0.0, None, QuantSpec(4)).quant_share == 1.0
    assert 0 < magnitude(W, H, 0.5, None, QuantSpec(4)).quant_share < 1


@pytest.mark.parametrize("seed", [0, 99])  # 99: a grid value bf16 rounds past the midpoint to its neighbour
def test_bf16_weights_stay_on_the_grid_in_their_dtype(seed):
    W, H = correlated_layer(32, 128, seed=seed)
    res = sparsegpt(W.bfloat16(), H, 0.5, None, QuantSpec(8, 64, sym=False))
    assert res.weight.dtype == torch.bfloat16 and res.quant.scale.dtype == torch.bfloat16
    assert on_grid(res.weight, res.quant)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 576])
def test_bitpack_round_trip(bits, n):
    c = torch.randint(0, 2**bits, (9, n), dtype=torch.uint8)
    p = pack_int32(c, bits)
    assert p.dtype == torch.int32 and p.shape == (9, -(-n * bits // 32))
    assert torch.equal(unpack_int32(p, bits, n), c)


def test_bitpack_hand_computed():
    assert pack_int32(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x321]]
    assert pack_int32(torch.full((1, 8), 15, dtype=torch.uint8), 4).tolist() == [[-1]]  # all ones
    with pytest.raises(ValueError, match="outside"):
        pack_int32(torch.tensor([[16]], dtype=torch.uint8), 4)
