"""SPDY: dp's error tables with sensitivity coefficients searched on the calibration loss."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from llmprune import allocate
from llmprune.block import prunable_linears
from llmprune.compression import compress_model
from llmprune.data import batched
from llmprune.plan import plan_sparsities
from llmprune.recipe import Recipe
from llmprune.spdy import calibration_loss


def plan_of(model, windows, recipe: Recipe, linears, device, reuse=None, progress=False) -> dict:
    """plan_sparsities for the recipe's allocation and compression specs."""
    run = recipe.resolve()
    return plan_sparsities(model, windows, run.allocation, run.compress, linears, device, run.calibration.batch_size,
                           reuse=reuse, progress=progress)


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


def _tables(target: float) -> dict[str, dict]:
    tables = {}
    for i in range(6):
        for kind, a in (("self_attn.q_proj", 3.0), ("mlp.down_proj", 1.0)):
            errors = {str(s): a * (i + 1) * s**3 for s in allocate.candidates(target)}
            tables[f"model.layers.{i}.{kind}"] = {"numel": 1000 * (1 + i % 3), "errors": errors}
    return tables


def test_snap_rounds_an_allocation_to_the_grid_at_the_target_and_the_anchor_reproduces_it():
    tables = _tables(0.6)
    total = sum(t["numel"] for t in tables.values())
    sign = {n: (1 if int(n.split(".")[2]) % 2 else -1) for n in tables}
    owl = {n: 0.6 + sign[n] * (0.05 if "q_proj" in n else -0.03) for n in tables}  # off the grid, mean 0.6
    snapped = allocate.snap(owl, tables, 0.6)
    assert sum(snapped[n] * t["numel"] for n, t in tables.items()) / total == pytest.approx(0.6, abs=1e-3)
    assert all(str(s) in tables[n]["errors"] for n, s in snapped.items())
    assert all(abs(snapped[n] - owl[n]) <= 0.0125 + 1e-9 for n in tables)  # the nearest grid point
    on_grid = dict.fromkeys(tables, 0.6)
    assert allocate.snap(on_grid, tables, 0.6) == on_grid
    # the coefficients anchored at an allocation make the dynamic program choose it again
    assert allocate.dp(tables, 0.6, weights=allocate.anchor_for(tables, snapped)) == snapped


def test_the_search_starts_from_the_best_of_the_given_allocations():
    tables = _tables(0.6)
    start = allocate.snap({n: 0.55 if "q_proj" in n else 0.65 for n in tables}, tables, 0.6)

    def loss(alloc):  # lowest at ``start``
        return sum(abs(alloc[n] - start[n]) for n in tables)

    found = allocate.spdy_search(tables, 0.6, loss, steps=0, starts={"mine": start})
    assert found["anchor"] == "mine" and found["sparsities"] == start and found["loss"] == 0


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
    report = compress_model(spdy_model, None, recipe.resolve(), windows=windows, progress=False)
    alloc = report["allocation"]["sparsities"]
    assert report["global_sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert alloc["model.layers.1.mlp.down_proj"] < 0.7
    compress_model(uniform_model, None, recipe.replace(allocation="uniform").resolve(), windows=windows, progress=False)
    batches = batched(windows, 8)
    spdy_loss = calibration_loss(spdy_model, batches, torch.device("cpu"), lambda i, b, p: None)
    uniform_loss = calibration_loss(uniform_model, batches, torch.device("cpu"), lambda i, b, p: None)
    assert spdy_loss < uniform_loss
    history = report["allocation"]["history"]
    owls = len(allocate.owl_lambdas(recipe.spdy_radius))  # OWL's allocations are starting points too
    assert len(history) <= recipe.spdy_steps + 2 + owls and report["allocation"]["coefficients"]
    assert sum(1 for h in history if str(h.get("candidate", "")).startswith("owl lambda=")) == owls


def test_the_search_leaves_an_in_memory_model_dense_and_reuse_reproduces_it(sensitive):
    import copy

    model, windows = sensitive
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(sparsity=0.6, allocation="spdy", device="cpu", spdy_steps=4, spdy_samples=8)
    linears = prunable_linears(model, recipe.resolve().compress)
    plan = plan_of(model, windows, recipe, linears, torch.device("cpu"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = plan_of(model, windows, recipe, linears, torch.device("cpu"), reuse=plan, progress=False)
    assert again["sparsities"] == plan["sparsities"]


def test_owl_lambda_auto_takes_the_lambda_of_lowest_calibration_loss_of_real_runs(sensitive):
    import copy

    model, windows = sensitive
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(sparsity=0.6, allocation="owl", owl_lambda="auto", owl_m=2.0, device="cpu", owl_samples=8)
    linears = prunable_linears(model, recipe.resolve().compress)
    plan = plan_of(model, windows, recipe, linears, torch.device("cpu"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # dense again after the trials
    scored = plan["lambda_search"]
    assert [c["owl_lambda"] for c in scored] == list(allocate.OWL_AUTO)
    assert plan["owl_lambda"] == min(scored, key=lambda c: c["loss"])["owl_lambda"]
    # each trial is a real compression scored on its windows: lambda 0 is a uniform run on the first 8
    uniform = copy.deepcopy(model)
    compress_model(uniform, None, recipe.replace(allocation="uniform").resolve(), windows=windows[:8], progress=False)
    loss = calibration_loss(uniform, batched(windows[:8], recipe.batch_size), torch.device("cpu"),
                            lambda i, b, p: None)
    assert scored[0]["loss"] == pytest.approx(loss, rel=1e-5)
    # the allocation is OWL's own at the chosen lambda
    lam = plan["owl_lambda"]
    fixed = plan_of(model, windows, recipe.replace(owl_lambda=lam or 0.05), linears, torch.device("cpu"),
                            progress=False)
    want = fixed["sparsities"] if lam else dict.fromkeys(fixed["sparsities"], 0.6)
    assert plan["sparsities"] == pytest.approx(want)


@pytest.mark.parametrize("value, ok", [("auto", True), (0.05, True), (1, False), ("big", False), (True, False)])
def test_owl_lambda_is_a_number_in_range_or_auto(value, ok):
    from llmprune.errors import UsageError
    from llmprune.recipe import recipe_from_dict

    data = {"sparsity": 0.6, "allocation": "owl", "owl_lambda": value}
    if ok:
        assert recipe_from_dict(data).owl_lambda == value
    else:
        with pytest.raises(UsageError, match="owl_lambda"):
            recipe_from_dict(data)


def test_owl_lambda_trials_leave_fused_experts_whole():
    model = tiny_model("gpt_oss")  # fused, transposed experts with biases: written through views
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(sparsity=0.6, allocation="owl", owl_lambda="auto", owl_m=2.0, device="cpu", owl_samples=8)
    plan = plan_of(model, windows, recipe, prunable_linears(model, recipe.resolve().compress), torch.device("cpu"),
                           progress=False)
    assert len(plan["lambda_search"]) == len(allocate.OWL_AUTO)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_plan_versions_are_the_solvers_own_with_their_relative_errors(method):
    """The plan's table entry of each candidate sparsity is the solver's answer at that sparsity and
    relative_error of it: sparsegpt's (stacked sweeps, error from its OBS losses) as one call per level."""
    from llmprune.solve import solve_levels
    from llmprune.solvers import SOLVERS
    from llmprune.solvers.result import relative_error

    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 192, generator=g) @ torch.randn(192, 192, generator=g) * torch.rand(192, generator=g)
    H = 2 / 1024 * X.T @ X
    H[:, 5] = H[5, :] = 0  # a dead input
    W = torch.randn(64, 192, generator=g)
    levels = allocate.candidates(0.7)
    got = solve_levels(W, H, levels, Recipe(method=method, sparsity=0.7).resolve().compress.solve)
    assert [s for s, _, _ in got] == levels
    for s, weight, err in got:
        ref = SOLVERS[method](W, H, s)
        torch.testing.assert_close(weight, ref.weight, atol=1e-5, rtol=0)
        assert int((weight == 0).sum()) >= int(s * W.numel())
        assert err == pytest.approx(relative_error(W, ref.weight, H), rel=1e-5)


def test_the_plan_pass_runs_each_block_once_with_the_tables_of_two_passes(sensitive, monkeypatch):
    """The plan reads dense Hessians while the block's one pass keeps its outputs for the next block (the
    engine's sequential pass with nothing changed); where that pass does not fit it runs the block twice.
    Both give the same tables and search, and the one-pass plan calls each block's forward half as often."""
    import copy

    from llmprune.engine import BlockPass

    model, windows = sensitive
    recipe = Recipe(sparsity=0.6, allocation="spdy", device="cpu", spdy_steps=2, spdy_samples=4)
    def plan(fits: bool) -> tuple[dict, int]:
        m = copy.deepcopy(model)
        counter = [0]
        m.model.layers[1].register_forward_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
        with monkeypatch.context() as mp:
            if not fits:
                mp.setattr(BlockPass, "sequential_fits", lambda self, modules: "too big (test)")
            out = plan_of(m, windows, recipe, prunable_linears(m, recipe.resolve().compress), torch.device("cpu"),
                                  progress=False)
        return out, counter[0]

    (once, n_once), (twice, n_twice) = plan(True), plan(False)
    assert once["tables"] == twice["tables"] and once["sparsities"] == twice["sparsities"]
    calls = {"once": n_once, "twice": n_twice}
    batches = -(-len(windows) // recipe.batch_size)
    scoring = (recipe.spdy_steps + 2 + len(allocate.owl_lambdas(recipe.spdy_radius))) * 1  # one batch per score
    assert calls["twice"] - calls["once"] == batches, calls
    assert calls["once"] <= batches + scoring
