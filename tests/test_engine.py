"""The streaming engine and the Hessian hooks on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, VOCAB, tiny_model

from llmprune.arch import find_blocks, find_linears
from llmprune.compression import compress_model
from llmprune.engine import Stream
from llmprune.errors import UsageError
from llmprune.hessian import HessianCollector, accumulator_dtype, as_solver_hessian, hessian_update
from llmprune.recipe import Recipe


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("prefetch", [False, True])
def test_streamed_forward_equals_model_forward(family, prefetch):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (5, 24))  # 24 > sliding window 8 where the family has one
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    stream = Stream(model, [ids[:2], ids[2:4], ids[4:]], "cpu", prefetch=prefetch)  # uneven last batch
    stream.run()
    with stream.non_block_modules_on_device():
        got = torch.cat([stream.logits(b) for b in range(3)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("method,pattern", [("sparsegpt", "unstructured"), ("wanda", "2:4"), ("magnitude", "4:8")])
def test_compress_prunes_linears_and_leaves_the_rest_bit_identical(family, method, pattern):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path, blocks = find_blocks(model)
    linear_weights = {f"{path}.{i}.{n}.weight" for i, b in enumerate(blocks) for n in find_linears(b)}
    windows = torch.randint(0, VOCAB, (6, 16))
    recipe = Recipe(method=method, pattern=pattern, batch_size=4, device="cpu")
    report = compress_model(model, None, recipe.resolve(), windows)
    after = model.state_dict()
    for key, value in after.items():
        if key in linear_weights:
            assert (value == 0).float().mean() == pytest.approx(0.5, abs=1e-6), key
        else:
            assert torch.equal(value, before[key]), f"{key} changed"
    assert len(report["layers"]) == len(linear_weights)
    assert report["global_sparsity"] == pytest.approx(0.5)


def test_hessian_update_incremental_equals_batch():
    X = torch.randn(300, 16, dtype=torch.float64)
    H, n = torch.zeros(16, 16, dtype=torch.float64), 0
    for chunk in X.split([1, 50, 99, 150]):
        H, n = hessian_update(H, n, chunk)
    assert n == 300
    torch.testing.assert_close(H, 2 / 300 * X.T @ X)


def test_fp64_accumulation_makes_the_hessian_independent_of_how_tokens_are_batched():
    """--hessian-dtype fp64: whatever the batches (one process's, or each rank's share), the fp32 Hessian the
    solvers get is the same to the last bit; fp32 accumulation is not (what torchrun equality rests on)."""
    torch.manual_seed(0)
    X = torch.randn(4096, 48) * torch.logspace(-2, 2, 48)

    def fold(dtype_name: str, sizes: list[int]) -> torch.Tensor:
        H, n = torch.zeros(48, 48, dtype=accumulator_dtype(dtype_name)), 0
        for chunk in X.split(sizes):
            H, n = hessian_update(H, n, chunk, dtype_name)
        return as_solver_hessian(H)

    splits = ([4096], [512] * 8, [100, 1000, 2996], [1024, 7, 3065])
    exact = [fold("fp64", s) for s in splits]
    assert all(h.dtype == torch.float32 and torch.equal(h, exact[0]) for h in exact)
    rounded = [fold("fp32", s) for s in splits]
    assert not all(torch.equal(h, rounded[0]) for h in rounded)
    with pytest.raises(UsageError, match="hessian_dtype"):
        Recipe(hessian_dtype="fp16")


def test_linears_reading_one_input_share_one_hessian():
    """q/k/v and gate/up are grouped by input identity; sharing changes nothing in the result."""
    model = tiny_model("llama")
    block = find_blocks(model)[1][0]
    linears = find_linears(block)
    hidden = torch.randn(3, 10, 64)
    pos = torch.arange(10).unsqueeze(0)
    rope = model.model.rotary_emb(hidden, pos)
    with torch.no_grad(), HessianCollector(linears) as hc:
        for _ in range(2):
            block(hidden, position_embeddings=rope, attention_mask=None)
    groups = {tuple(sorted(g)) for g in hc.groups().values()}
    assert ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj") in groups
    assert ("mlp.gate_proj", "mlp.up_proj") in groups
    assert len(hc.H) == 4  # qkv, o, gate/up, down

    # per-linear accumulation, no sharing: one collector per linear gives the same matrices
    for name, mod in linears.items():
        with torch.no_grad(), HessianCollector({name: mod}) as single:
            for _ in range(2):
                block(hidden, position_embeddings=rope, attention_mask=None)
        assert torch.equal(single.hessian(name), hc.hessian(name)), name


def test_low_precision_inputs_accumulate_to_the_float64_hessian():
    """bf16 activations: their products are exact in fp32, so H from them matches a float64 reference.

    On CUDA the product runs on tensor cores with fp32 accumulation; on CPU the same update upcasts first.
    Outlier features (x100) check that the running average neither overflows nor drowns small terms.
    """
    torch.manual_seed(0)
    X = torch.randn(4096, 64)
    X[:, :4] *= 100
    X = X.bfloat16()
    H, n = torch.zeros(64, 64), 0
    for chunk in X.split(128):  # 32 batches
        H, n = hessian_update(H, n, chunk)
    ref = 2 / 4096 * X.double().T @ X.double()
    rel = (H.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, float(rel)


def test_a_hessian_is_freed_once_the_last_linear_reading_it_is_solved(monkeypatch):
    """The widest layer's solve must not run beside the block's other Hessians (host/device memory)."""
    import weakref

    import llmprune.solve as solve

    model = tiny_model("llama")
    real = solve.SOLVERS["sparsegpt"]
    seen: list[tuple[str, weakref.ref]] = []  # (first linear of each group, weakref to its Hessian)
    alive_at_down: list[str] = []

    def solver(W, H, *a, **k):
        if not any(r() is H for _, r in seen):
            seen.append((str(len(seen)), weakref.ref(H)))
        if W.shape[1] == model.config.intermediate_size:  # down_proj: solved last in the block
            alive_at_down.extend(name for name, r in seen if r() is not None and r() is not H)
        return real(W, H, *a, **k)

    monkeypatch.setitem(solve.SOLVERS, "sparsegpt", solver)
    compress_model(model, None, Recipe(method="sparsegpt", batch_size=4, device="cpu").resolve(),
                   torch.randint(0, VOCAB, (4, 16)))
    assert len(seen) == 4 * model.config.num_hidden_layers  # q/k/v, o, gate/up, down: four Hessians a block
    assert alive_at_down == []
