"""SPDY: dp's error tables with sensitivity coefficients searched on the calibration loss."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from llmprune import allocate
from llmprune.compression import compress_model, plan_sparsities, prunable_linears
from llmprune.data import batched
from llmprune.recipe import Recipe
from llmprune.spdy import calibration_loss


def test_with_equal_tables_and_coefficients_it_is_uniform():
    errors = {str(s): s**2 for s in allocate.candidates(0.7)}
    tables = {f"model.layers.{i}.mlp.down_proj": {"numel": 4096, "errors": errors} for i in range(6)}
    assert set(allocate.dp(tables, 0.7, weights=dict.fromkeys(tables, 3.0)).values()) == {0.7}
    found = allocate.spdy_search(tables, 0.7, lambda alloc: 1.0, steps=5)  # a flat loss: nothing to gain
    assert set(found["sparsities"].values()) == {0.7}


def test_coefficients_move_the_dp_and_the_target_holds():
    tables = {}
    for i in range(4):
        for kind in ("self_attn.q_proj", "mlp.down_proj"):
            tables[f"model.layers.{i}.{kind}"] = {
                "numel": 1000 * (i + 1), "errors": {str(s): s**3 for s in allocate.candidates(0.6)}}
    heavy = "model.layers.2.mlp.down_proj"

    def loss(alloc):  # layer 2's down_proj hurts the loss 50x more than its table says
        return sum((50 if n == heavy else 1) * tables[n]["errors"][str(s)] for n, s in alloc.items())

    found = allocate.spdy_search(tables, 0.6, loss, steps=40, seed=0)
    total = sum(t["numel"] for t in tables.values())
    assert sum(found["sparsities"][n] * t["numel"] for n, t in tables.items()) / total == pytest.approx(0.6, abs=1e-3)
    assert found["sparsities"][heavy] < 0.6
    assert found["loss"] < loss(dict.fromkeys(tables, 0.6))


@pytest.fixture(scope="module")
def sensitive():
    """A tiny llama whose block 1 MLP output is scaled up 8x: its pruning errors dominate the loss, which
    relative layer errors (the tables) cannot see; its head scaled up so the loss is not flat at ln(vocab)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(8)
        model.lm_head.weight.mul_(40)
    windows = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    return model, windows


def test_spdy_spares_the_sensitive_layer_and_lowers_the_calibration_loss(sensitive):
    import copy

    model, windows = sensitive
    recipe = Recipe(sparsity=0.7, allocation="spdy", device="cpu", spdy_steps=16, spdy_samples=16, seed=0)
    spdy_model, uniform_model = copy.deepcopy(model), copy.deepcopy(model)
    report = compress_model(spdy_model, None, recipe, windows=windows, progress=False)
    alloc = report["allocation"]["sparsities"]
    assert report["global_sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert alloc["model.layers.1.mlp.down_proj"] < 0.7
    compress_model(uniform_model, None, recipe.replace(allocation="uniform"), windows=windows, progress=False)
    batches = batched(windows, 8)
    spdy_loss = calibration_loss(spdy_model, batches, torch.device("cpu"), lambda i, b: None)
    uniform_loss = calibration_loss(uniform_model, batches, torch.device("cpu"), lambda i, b: None)
    assert spdy_loss < uniform_loss
    history = report["allocation"]["history"]
    assert len(history) <= recipe.spdy_steps + 2 and report["allocation"]["coefficients"]


def test_the_search_leaves_an_in_memory_model_dense_and_reuse_reproduces_it(sensitive):
    import copy

    model, windows = sensitive
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(sparsity=0.6, allocation="spdy", device="cpu", spdy_steps=4, spdy_samples=8)
    linears = prunable_linears(model, recipe)
    plan = plan_sparsities(model, windows, recipe, linears, torch.device("cpu"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = plan_sparsities(model, windows, recipe, linears, torch.device("cpu"), reuse=plan, progress=False)
    assert again["sparsities"] == plan["sparsities"]
