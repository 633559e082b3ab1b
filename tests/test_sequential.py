"""One forward per block: sublayer-by-sublayer (true-sequential) compression equals the slow reference that
recalibrates each linear on a fresh forward through the already-compressed sublayers before it."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, VOCAB, tiny_model

from llmprune.arch import find_blocks, find_linears, get_weight, set_weight
from llmprune.compression import compress_model
from llmprune.data import batched
from llmprune.engine import Stream
from llmprune.hessian import hessian_update, layer_input_width
from llmprune.recipe import Recipe
from llmprune.solvers import SOLVERS

WINDOWS = 4  # two batches of two: the cross-batch bookkeeping is exercised


def recipe(**kw) -> Recipe:
    return Recipe(**{"method": "sparsegpt", "batch_size": 2, "device": "cpu", "block_size": 32} | kw)


def windows(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (WINDOWS, 16), generator=torch.Generator().manual_seed(seed))


class _Stop(Exception):
    pass


def slow_reference(model: torch.nn.Module, ids: torch.Tensor, rec: Recipe) -> None:
    """Each linear, in the order the block calls them, gets its Hessian from a fresh forward of every batch
    through the block as it is then (the sublayers before it already compressed), stopped at that linear."""

    def on_block(i: int, block: torch.nn.Module, block_pass) -> None:
        linears = find_linears(block)
        order: list[str] = []
        handles = [m.register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
                   for n, m in linears.items()]
        block_pass()  # only to learn the call order
        for h in handles:
            h.remove()
        for name in order:
            mod = linears[name]
            cols = layer_input_width(mod)
            H, n = torch.zeros(cols, cols), 0

            def grab(m, args, cols=cols):
                nonlocal H, n
                H, n = hessian_update(H, n, args[0].reshape(-1, cols), rec.hessian_dtype)
                raise _Stop

            handle = mod.register_forward_pre_hook(grab)
            stream = block_pass.stream
            for ids_b, h in zip(stream.batches, stream.hidden, strict=True):
                call = stream.calls[tuple(ids_b.shape)][i]
                try:
                    block(h, *call.args, **call.kwargs)
                except _Stop:
                    pass
            handle.remove()
            W = get_weight(mod)
            res = SOLVERS[rec.method](W, H, rec.target_sparsity, rec.nm, rec.quant, block_size=rec.block_size,
                                      damp_frac=rec.damp_frac, act_order=rec.act_order, kernels=rec.kernels)
            set_weight(mod, res.weight)

    Stream(model, batched(ids, rec.batch_size), "cpu", progress=False).run(on_block)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", sorted(TINY))
def test_sequential_equals_the_slow_reference(family):
    rec = recipe()
    ids = windows()
    model = tiny_model(family)
    report = compress_model(model, None, rec.resolve(), ids, progress=False)
    assert report["sequential"]["two_pass_blocks"] == {}
    assert report["sequential"]["kept_inputs_peak_bytes"] > 0
    ref = tiny_model(family)
    slow_reference(ref, ids, rec)
    got, want = state(model), state(ref)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # and it is not the two-pass result: the Hessians really came from the compressed sublayers
    two = tiny_model(family)
    compress_model(two, None, recipe(sequential=False).resolve(), ids, progress=False)
    assert any(not torch.equal(got[k], v) for k, v in state(two).items())


@pytest.mark.parametrize("wbits,pattern", [(None, "2:4"), (4, "unstructured")])
def test_sequential_equals_the_slow_reference_for_patterns_and_joint_quantization(wbits, pattern):
    kw = {"pattern": pattern} | ({"wbits": wbits, "group_size": 32} if wbits else {})
    rec = recipe(**kw)
    ids = windows()
    model, ref = tiny_model("llama"), tiny_model("llama")
    compress_model(model, None, rec.resolve(), ids, progress=False)
    slow_reference(ref, ids, rec)
    got, want = state(model), state(ref)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_one_linear_per_block_equals_the_two_pass_result():
    ids = windows()
    skip = (r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj)$",)
    results = []
    for sequential in (True, False):
        model = tiny_model("llama")
        compress_model(model, None, recipe(skip=skip, sequential=sequential).resolve(), ids, progress=False)
        results.append(state(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_streamed_output_equals_a_plain_forward_of_the_compressed_model(family):
    """The sequential pass's own block outputs are the next block's inputs: after the last block they equal
    what a fresh stream of the compressed model computes."""
    from llmprune.block import prunable_linears, sequential_block

    rec = recipe()
    ids = windows()
    model = tiny_model(family)
    linears = prunable_linears(model, rec.resolve().compress)
    prefixes = list(linears)

    def on_block(i, block, block_pass):
        spec = rec.resolve().compress
        sequential_block(prefixes[i], linears[prefixes[i]], block_pass, spec, lambda n: (spec.solve, 0.5))

    streamed = Stream(model, batched(ids, 2), "cpu", progress=False).run(on_block)
    plain = Stream(model, batched(ids, 2), "cpu", progress=False).run()
    assert len(streamed) == len(plain) == 2
    for a, b in zip(streamed, plain, strict=True):  # (test_engine: the plain stream is the model's forward)
        assert torch.equal(a, b)


def test_an_error_in_a_solve_leaves_no_thread_behind(monkeypatch):
    import threading

    import llmprune.solve as solve

    calls = []

    def failing(W, H, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("solver broke")
        return SOLVERS["magnitude"](W, H, *a, **k)

    monkeypatch.setitem(solve.SOLVERS, "sparsegpt", failing)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="solver broke"):
        compress_model(tiny_model("llama"), None, recipe().resolve(), windows(), progress=False)
    assert threading.active_count() == before


def test_a_forward_error_is_raised_once_and_no_thread_is_left(monkeypatch):
    import threading

    model = tiny_model("llama")
    path, blocks = find_blocks(model)

    def broken(*a, **k):
        raise ValueError("mlp broke")

    monkeypatch.setattr(blocks[1].mlp, "forward", broken)
    before = threading.active_count()
    with pytest.raises(ValueError, match="mlp broke"):
        compress_model(model, None, recipe().resolve(), windows(), progress=False)
    assert threading.active_count() == before


def test_too_little_memory_falls_back_to_two_passes_and_says_so(monkeypatch, caplog):
    import psutil

    class Tiny:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    ids = windows()
    model = tiny_model("llama")
    report = compress_model(model, None, recipe().resolve(), ids, progress=False)
    reasons = report["sequential"]["two_pass_blocks"]
    assert set(reasons) == {"model.layers.0", "model.layers.1"}
    assert "MiB of activations" in reasons["model.layers.0"]
    assert "two passes instead of one" in caplog.text
    monkeypatch.undo()
    two = tiny_model("llama")
    compress_model(two, None, recipe(sequential=False).resolve(), ids, progress=False)
    assert all(torch.equal(v, state(two)[k]) for k, v in state(model).items())
