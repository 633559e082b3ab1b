"""Non-uniform sparsity: OWL and the dynamic program keep the global target, and prune where it hurts least."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_model

from llmprune import allocate
from llmprune.compression import compress_model
from llmprune.engine import Stream
from llmprune.errors import UsageError
from llmprune.recipe import Recipe


def test_owl_hand_computed():
    s = allocate.owl([0.01, 0.03, 0.02], [10, 10, 10], 0.7, 0.08)
    assert s == pytest.approx([0.78, 0.62, 0.70])


def test_owl_keeps_the_parameter_weighted_target():
    rng = random.Random(1)
    ratios = [rng.random() for _ in range(9)]
    sizes = [rng.randint(100, 10_000) for _ in range(9)]
    s = allocate.owl(ratios, sizes, 0.6, 0.08)
    assert sum(a * b for a, b in zip(s, sizes, strict=True)) / sum(sizes) == pytest.approx(0.6)
    assert all(0.6 - 0.08 - 1e-9 <= x <= 0.6 + 0.08 + 1e-9 for x in s)
    assert s[ratios.index(max(ratios))] == min(s)  # most outliers -> least pruned


def test_dp_with_equal_tables_is_uniform():
    errors = {str(s): s**2 for s in allocate.candidates(0.7)}
    tables = {f"l{i}": {"numel": 4096, "errors": errors} for i in range(6)}
    assert set(allocate.dp(tables, 0.7).values()) == {0.7}


def test_dp_meets_the_target_and_prunes_the_tolerant_layers():
    cands = allocate.candidates(0.5)
    tables = {}
    rng = random.Random(0)  # seeded: the module-level generator's state depends on which tests ran before
    for i in range(40):
        k = rng.uniform(0.1, 10)  # how much this layer suffers
        tables[f"l{i}"] = {"numel": rng.randint(1000, 50_000), "errors": {str(s): k * s**3 for s in cands}}
    out = allocate.dp(tables, 0.5)
    total = sum(t["numel"] for t in tables.values())
    got = sum(out[n] * t["numel"] for n, t in tables.items()) / total
    assert got == pytest.approx(0.5, abs=1e-3)
    uniform_err = sum(t["errors"]["0.5"] for t in tables.values())
    assert sum(tables[n]["errors"][str(s)] for n, s in out.items()) <= uniform_err
    tough = max(tables, key=lambda n: tables[n]["errors"]["0.5"])
    easy = min(tables, key=lambda n: tables[n]["errors"]["0.5"])
    assert out[tough] < out[easy]


@pytest.mark.parametrize("allocation", ["owl", "spdy"])
def test_compress_with_allocation_keeps_the_global_target(allocation, monkeypatch):
    model = tiny_model("llama")
    windows = torch.randint(0, model.config.vocab_size, (4, 32))
    recipe = Recipe(sparsity=0.6, allocation=allocation, device="cpu", owl_m=2.0, spdy_steps=3, spdy_samples=4)
    report = compress_model(model, None, recipe.resolve(), windows)
    layers = report["layers"]
    assert report["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    alloc = report["allocation"]
    assert alloc["method"] == allocation and set(alloc["sparsities"]) == {layer["name"] for layer in layers}
    if allocation == "owl":
        assert len({round(layer["sparsity"], 3) for layer in layers}) > 1  # not uniform
    if allocation == "spdy":  # the report alone reproduces the allocation, with no measuring pass or search
        passes = []
        real_run = Stream.run
        monkeypatch.setattr(Stream, "run", lambda self, *a, **k: passes.append(1) or real_run(self, *a, **k))
        again = compress_model(tiny_model("llama"), None, recipe.resolve(), windows, reuse_errors=alloc)
        assert again["allocation"]["sparsities"] == alloc["sparsities"]
        assert len(passes) == 1  # the compression pass only
        with pytest.raises(UsageError, match="searched for sparsity 0.6"):
            compress_model(tiny_model("llama"), None, recipe.replace(sparsity=0.55).resolve(), windows,
                           reuse_errors=alloc)


def test_an_unknown_allocation_names_the_choices():
    with pytest.raises(UsageError, match="choose uniform, owl, spdy"):
        Recipe(sparsity=0.6, allocation="dp")


def test_dp_finds_the_least_error_of_every_combination_within_the_target():
    """The banded knapsack against brute force: 6 layers x 5 candidates, every combination within 0.1%."""
    import itertools

    rng = random.Random(3)
    cands = allocate.candidates(0.6, 0.05)
    tables = {f"model.layers.{i}.mlp.down_proj": {"numel": rng.randint(1000, 9000),
                                                  "errors": {str(s): rng.uniform(0.5, 2) * s**3 for s in cands}}
              for i in range(6)}
    names, total = list(tables), sum(t["numel"] for t in tables.values())
    out = allocate.dp(tables, 0.6)
    got = sum(tables[n]["errors"][str(out[n])] for n in names)
    best = min(sum(tables[n]["errors"][str(s)] for n, s in zip(names, combo, strict=True))
               for combo in itertools.product(cands, repeat=len(names))
               if abs(sum(s * tables[n]["numel"] for n, s in zip(names, combo, strict=True)) / total - 0.6) <= 4e-4)
    assert sum(out[n] * tables[n]["numel"] for n in names) / total == pytest.approx(0.6, abs=1e-3)
    assert got <= best + 1e-12
