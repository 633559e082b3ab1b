"""SparseGPT's block functions against each other, where they must agree bit for bit: the torch loop
(``_obs_block``), its joint-quantization twin (``_joint_block``) and the fused Triton kernel (``_fused_block``,
on CPU by TRITON_INTERPRET=1). Where they agree only to fp32 rounding (a general H, fused vs torch) the
comparisons are in test_kernels.py, and against the paper's plain loop in test_solvers.py / test_quant.py.
"""

from __future__ import annotations

import pytest
import torch

from llmprune.pattern import Pattern, n_pruned
from llmprune.quant import QuantSpec
from llmprune.solvers.result import SolveResult
from llmprune.solvers.sparsegpt import sparsegpt, sparsegpt_levels

QUANTS = [None, QuantSpec(4, 16), QuantSpec(3, -1, sym=False)]  # none; dynamic groups, two per block; static


def problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, 3 * cols, generator=g)
    X[: cols // 4] *= 3  # uneven input scales, as in real activations
    X[5] = 0  # a dead input
    return torch.randn(rows, cols, generator=g), X @ X.T / X.shape[1]


def assert_same(a: SolveResult, b: SolveResult) -> None:
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.weight, b.weight)
    assert (a.quant is None) == (b.quant is None)
    if a.quant is not None:
        assert torch.equal(a.quant.scale, b.quant.scale) and torch.equal(a.quant.zero, b.quant.zero)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("pattern", [None, Pattern(2, 4)])
def test_a_given_mask_is_compensated_exactly_as_by_the_sweep_that_chose_it(kernels, quant, pattern):
    """admm and obc hand their masks to the sweep to be compensated (and quantized) around: the sweep's own
    mask, handed back, must give the same layer to the last bit, so choosing the mask (per block, or every M
    columns inside the loop) changes nothing but the mask."""
    W, H = problem(17, 64, seed=3 + len(QUANTS) * (pattern is not None))
    chose = sparsegpt(W, H, 0.5, pattern, quant, block_size=32, kernels=kernels)
    given = sparsegpt(W, H, 0.0, None, quant, block_size=32, kernels=kernels, mask=chose.mask)
    assert int(chose.mask.sum()) == W.numel() // 2
    assert_same(chose, given)
    assert given.obs_loss == chose.obs_loss and given.quant_share == chose.quant_share


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_given_mask_is_compensated_exactly_in_act_order(kernels):
    W, H = problem(17, 64, seed=11)
    quant = QuantSpec(4, 16)
    chose = sparsegpt(W, H, 0.5, None, quant, block_size=32, act_order=True, kernels=kernels)
    given = sparsegpt(W, H, 0.0, None, quant, block_size=32, act_order=True, kernels=kernels, mask=chose.mask)
    assert_same(chose, given)
    assert given.obs_loss == chose.obs_loss


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("pattern", [None, Pattern(2, 4)])
def test_with_a_diagonal_hessian_the_kernel_and_the_torch_loop_agree_bit_for_bit(quant, pattern):
    """A diagonal H updates no weight (H⁻¹ has no off-diagonal), so the last-bit differences between the fused
    kernel's and the torch loop's updates vanish: masks (chosen by w²/[H⁻¹]_cc², not magnitude, as d varies),
    weights and grids must be equal, and the losses equal to rounding."""
    g = torch.Generator().manual_seed(7 + (pattern is not None))
    W = torch.randn(17, 64, generator=g)
    H = torch.diag(torch.rand(64, generator=g) * 4 + 0.1)
    ref = sparsegpt(W, H, 0.5, pattern, quant, block_size=32, kernels="torch")
    got = sparsegpt(W, H, 0.5, pattern, quant, block_size=32, kernels="triton")
    assert_same(ref, got)
    assert got.obs_loss == pytest.approx(ref.obs_loss, rel=1e-6)
    kept = (W != 0) & ~ref.mask
    if quant is None:  # nothing moved: the kept weights are W's own
        assert torch.equal(ref.weight[kept], W[kept])


@pytest.mark.parametrize("quant", [None, QuantSpec(4, 32)])
def test_stacked_levels_with_a_diagonal_hessian_agree_bit_for_bit_across_kernels(quant):
    g = torch.Generator().manual_seed(9)
    W = torch.randn(12, 64, generator=g)
    H = torch.diag(torch.rand(64, generator=g) * 4 + 0.1)
    levels = [0.3, 0.5, 0.8]
    ref = sparsegpt_levels(W, H, levels, quant, block_size=32, kernels="torch")
    got = sparsegpt_levels(W, H, levels, quant, block_size=32, kernels="triton")
    for s, a, b in zip(levels, ref, got, strict=True):
        assert int(a.mask.sum()) == n_pruned(s, W.numel())
        assert_same(a, b)
