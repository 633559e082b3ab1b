"""The recipe is resolved once, at the API, into each stage's spec (Recipe.resolve -> compression.RunSpec): every
field reaches a stage, each stage sees what the recipe means for it, and nothing below the API reads the
recipe itself (its imports, checked from the source)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_api import import_graph

from llmprune.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]

# every recipe field -> (the recipe it is changed in, a valid other value): the stage specs must differ
FIELD_CASES: dict[str, tuple[dict, object]] = {
    "method": ({}, "wanda"),
    "sparsity": ({}, 0.6),
    "pattern": ({}, "2:4"),
    "calib": ({}, "shakespeare"),
    "split": ({}, "test"),
    "text_field": ({}, "body"),
    "by_document": ({}, True),
    "bos": ({}, False),
    "nsamples": ({}, 16),
    "seqlen": ({}, 64),
    "seed": ({}, 3),
    "block_size": ({}, 64),
    "damp_frac": ({}, 0.02),
    "device": ({}, "cpu"),
    "dtype": ({}, "float32"),
    "batch_size": ({}, 2),
    "hessian_dtype": ({}, "fp64"),
    "skip": ({}, ("q_proj",)),
    "wbits": ({}, 4),
    "group_size": ({"wbits": 4}, 32),
    "sym": ({"wbits": 4}, False),
    "quant_search": ({"wbits": 4}, "mse"),
    "act_order": ({"wbits": 4}, True),
    "format": ({"wbits": 4}, "compressed-tensors"),
    "grid": ({"wbits": 8}, "fp8"),
    "scheme": ({}, "W4A16"),
    "allocation": ({}, "owl"),
    "owl_m": ({"allocation": "owl"}, 3.0),
    "owl_lambda": ({"allocation": "owl"}, "auto"),
    "owl_samples": ({"allocation": "owl"}, 4),
    "spdy_radius": ({"allocation": "spdy"}, 0.2),
    "spdy_steps": ({"allocation": "spdy"}, 4),
    "spdy_samples": ({"allocation": "spdy"}, 2),
    "bits_choices": ({"allocation": "spdy", "wbits": 3, "sparsity": 0.5}, (2, 4)),
    "kernels": ({}, "torch"),
    "sequential": ({}, False),
    "admm_iters": ({"method": "admm"}, 5),
    "admm_rho0": ({"method": "admm"}, 0.1),
    "admm_rho_growth": ({"method": "admm"}, 1.5),
    "admm_refit_iters": ({"method": "admm"}, 3),
    "refit": ({"method": "magnitude"}, True),
    "refit_iters": ({"method": "magnitude", "refit": True}, 5),
    "obc_max_cols": ({"method": "obc"}, 64),
    "min_expert_tokens": ({}, 8),
    "drop_experts": ({}, 0.25),
    "reconstruct": ({}, 4),
    "reconstruct_lr": ({"reconstruct": 4}, 1e-4),
    "reconstruct_target": ({"reconstruct": 4}, "compressed"),
    "reconstruct_granularity": ({"reconstruct": 4}, "sublayer"),
    "reconstruct_norms": ({"reconstruct": 4}, True),
}


def stages(recipe: Recipe):
    """The resolved run without its record of the recipe and its label: only what the stages take."""
    return dataclasses.replace(recipe.resolve(), recipe={}, label="")


def test_every_recipe_field_has_a_case():
    assert set(FIELD_CASES) == {f.name for f in dataclasses.fields(Recipe)}


@pytest.mark.parametrize("name", sorted(FIELD_CASES))
def test_every_recipe_field_reaches_a_stage(name):
    base, value = FIELD_CASES[name]
    assert getattr(Recipe(**base), name) != value
    assert stages(Recipe(**base)) != stages(Recipe(**base | {name: value})), f"{name} reaches no stage spec"


def test_the_record_is_the_recipe_as_written():
    rec = Recipe(method="admm", sparsity=0.6, skip=("q_proj",))
    run = rec.resolve()
    assert run.recipe == rec.to_dict() and run.label == rec.label


def test_what_the_recipe_means_is_decided_once():
    from llmprune.solvers.admm import AdmmOptions
    from llmprune.solvers.sparsegpt import SparseGPTOptions

    run = Recipe(method="admm", sparsity=0.6, block_size=64, admm_iters=7).resolve()
    assert run.compress.solve.options == AdmmOptions(block_size=64, iters=7)
    assert run.compress.solve.sweep == SparseGPTOptions(block_size=64)  # its warm start's sweep
    assert run.compress.sparsity == 0.6 and run.needs_data and run.allocation is None
    wanda = Recipe(method="wanda").resolve().compress.solve
    assert wanda.diagonal_only and wanda.options is None and wanda.kwargs() == {}
    assert not Recipe(method="wanda", refit=True).resolve().compress.solve.diagonal_only
    magnitude = Recipe(method="magnitude").resolve()
    assert magnitude.compress.solve.data_free and not magnitude.needs_data
    assert Recipe(method="magnitude", drop_experts=0.25).resolve().needs_data  # scored on calibration data
    gptq = Recipe(wbits=4).resolve()  # nothing pruned: an expert with too few tokens is rounded to nearest
    assert gptq.compress.sparsity == 0 and gptq.compress.solve.fallback == "rtn" and gptq.compress.changes_weights
    assert Recipe(pattern="2:4", wbits=4).resolve().compress.solve.fallback == "magnitude"
    assert Recipe(calib="c4").resolve().calibration.by_document
    assert not Recipe(calib="c4", by_document=False).resolve().calibration.by_document
    assert Recipe(method="obc").resolve().compress.obc_max_cols == 1024
    assert Recipe().resolve().compress.obc_max_cols is None  # no width limit for the other solvers
    spdy = Recipe(sparsity=0.7, allocation="spdy", seed=2).resolve().allocation
    assert (spdy.method, spdy.target, spdy.seed) == ("spdy", 0.7, 2)
    assert Recipe(reconstruct=8).resolve().reconstruction.steps == 8
    assert Recipe(wbits=4, format="compressed-tensors").resolve().output.compressed_tensors


# the modules that may read the recipe: the API that resolves it, the CLI that builds it from flags, the
# package's lazy exports, and the recipe itself
RECIPE_READERS = {"llmprune", "llmprune.api", "llmprune.cli", "llmprune.recipe"}


def test_nothing_below_the_api_imports_the_recipe():
    graph = import_graph()
    assert "llmprune.recipe" in graph["llmprune.api"]  # the check sees imports at all
    readers = {name for name, edges in graph.items() if "llmprune.recipe" in edges}
    assert readers <= RECIPE_READERS, f"import llmprune.recipe: {sorted(readers - RECIPE_READERS)}"
    low = ("llmprune.solvers", "llmprune.engine", "llmprune.hessian", "llmprune.quant", "llmprune.kernels")
    for name, edges in graph.items():
        if name.startswith(low):
            assert not edges & {"llmprune.recipe", "llmprune.api"}, f"{name} imports {edges & RECIPE_READERS}"


def test_importing_the_cli_imports_no_solver_kernel_or_triton():
    """What `llmprune --help` loads: the recipe's defaults are read from the solvers' source, not imported."""
    code = ("import sys, llmprune.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith(('llmprune.solvers', 'llmprune.kernels',"
            " 'kernels', 'triton', 'torch'))))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"


def test_a_renamed_recipe_key_is_refused_with_its_new_name():
    from llmprune import UsageError, make_recipe

    with pytest.raises(UsageError, match="'dp_radius' is now called 'spdy_radius': rename the key"):
        make_recipe({"allocation": "spdy", "dp_radius": 0.1})
    assert make_recipe({"allocation": "spdy", "spdy_radius": 0.2}).spdy_radius == 0.2
