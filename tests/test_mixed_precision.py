"""spdy over bit-widths (--bits-choices): the knapsack keeps the average under the budget, every layer lands on
one of the choices, and the checkpoint is compressed-tensors mixed-precision that transformers loads with our
logits."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_cli import compress_args, run

from llmprune import allocate
from llmprune.recipe import recipe_from_dict


@pytest.fixture
def calib_txt(tmp_path):
    from llmprune.data import builtin_text_path

    p = tmp_path / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


NUMEL = {"a": 1000, "b": 3000, "c": 500, "d": 2000}


def _bit_tables(seed: int = 0) -> dict[str, dict]:
    """Random error tables over {2, 3, 4, 8} bits: the error falls as the bits rise (4x per bit, as rounding's)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in NUMEL.items():
        scale = float(torch.rand((), generator=g)) * 10 + 0.1
        out[name] = {"numel": n, "errors": {allocate.bit_key(b): scale * 4.0 ** -b for b in (2, 3, 4, 8)},
                     "costs": allocate.bit_costs((2, 3, 4, 8))}
    return out


def _average(bits: dict[str, str]) -> float:
    return sum(int(k.removeprefix("w")) * NUMEL[n] for n, k in bits.items()) / sum(NUMEL.values())


@pytest.mark.parametrize("budget", [2.5, 3.0, 3.7, 5.0])
def test_bit_knapsack_stays_under_the_budget_and_beats_every_other_choice(budget):
    """The dp's choice: average bits <= the budget, and no assignment under the budget has a lower summed error
    (checked against all 4^4 of them)."""
    import itertools

    tables = _bit_tables()
    target = 1 - budget / 8
    got = allocate.dp(tables, target, at_least=True)
    assert set(got.values()) <= {"w2", "w3", "w4", "w8"}
    assert _average(got) <= budget + 1e-9
    best = min(
        sum(tables[n]["errors"][k] for n, k in zip(NUMEL, combo, strict=True))
        for combo in itertools.product(["w2", "w3", "w4", "w8"], repeat=len(NUMEL))
        if _average(dict(zip(NUMEL, combo, strict=True))) <= budget + 1e-9
    )
    assert sum(tables[n]["errors"][k] for n, k in got.items()) == pytest.approx(best, rel=1e-9)


def test_spdy_search_over_bits_starts_from_uniform_and_keeps_the_budget():
    """The search over bit tables: uniform (every layer at the budget's width) is scored as a start, and when
    it wins its coefficients (anchor_for on bit keys) steer the program; every candidate stays under budget."""
    tables = _bit_tables(1)
    scored = []

    def score(alloc):  # favours uniform: the search has to start from it and keep it
        scored.append(dict(alloc))
        return 0.0 if set(alloc.values()) == {"w3"} else 1.0 + _average(alloc)

    found = allocate.spdy_search(tables, 1 - 3 / 8, score, steps=6, uniform="w3")
    assert found["anchor"] == "uniform" and set(found["sparsities"].values()) == {"w3"}
    assert all(_average(a) <= 3 + 1e-9 for a in scored)


def test_bits_choices_bad_input_is_refused_before_any_work():
    from llmprune.errors import UsageError

    for bad, words in (
        ({"bits_choices": [2, 4], "wbits": 3}, "--allocation spdy"),
        ({"bits_choices": [2, 4], "allocation": "spdy"}, "--wbits between 2 and 4"),
        ({"bits_choices": [2, 4], "allocation": "spdy", "wbits": 5}, "--wbits between 2 and 4"),
        ({"bits_choices": [4], "allocation": "spdy", "wbits": 4}, "two or more"),
        ({"bits_choices": [1, 4], "allocation": "spdy", "wbits": 3}, "in 2..8"),
        ({"bits_choices": [2, 4], "allocation": "spdy", "wbits": 3, "method": "wanda"}, "does not quantize"),
        ({"bits_choices": "x", "allocation": "spdy", "wbits": 3}, "list of bit-widths"),
    ):
        with pytest.raises(UsageError, match=re.escape(words)):
            recipe_from_dict(bad)


def test_mixed_precision_checkpoint_loads_in_transformers_with_our_logits(tiny_model_dir, calib_txt, tmp_path, capsys):
    """A 3-bit average over {2, 4, 8}: each linear on one of them, the average at most 3 (report and stored
    grids agree), the compressed-tensors checkpoint mixed-precision with one group per width (streamed or in
    memory alike), and transformers' logits from it equal those of our dense output; no sparsity_config; our
    own reader and `info` decode each layer on its own grid."""
    from transformers import AutoModelForCausalLM

    flags = ["--allocation", "spdy", "--bits-choices", "2,4,8", "--wbits", "3", "--group-size", "16",
             "--spdy-steps", "3", "--spdy-samples", "2"]
    outs = {}
    for fmt, extra in (("dense", []), ("compressed-tensors", []), ("whole", ["--format", "compressed-tensors",
                                                                           "--no-lazy"])):
        outs[fmt] = tmp_path / fmt
        fmt_flags = ["--format", fmt] if not extra else extra
        code, printed, err = run(compress_args(tiny_model_dir, outs[fmt], calib_txt, *fmt_flags, *flags), capsys)
        assert code == 0, err
    # streamed (the default) and in memory: the same config and allocation
    assert (outs["whole"] / "config.json").read_bytes() == (outs["compressed-tensors"] / "config.json").read_bytes()
    assert "bits per weight on average" in printed
    report = json.loads((outs["compressed-tensors"] / "llmprune.json").read_text())
    alloc = report["allocation"]
    widths = alloc["bits"]
    assert set(widths.values()) <= {2, 4, 8} and len(set(widths.values())) > 1
    numel = {r["name"]: r["shape"][0] * r["shape"][1] for r in report["layers"]}
    assert sum(widths[n] * numel[n] for n in numel) / sum(numel.values()) <= 3 + 1e-9
    assert alloc["average_bits"] == pytest.approx(sum(widths[n] * numel[n] for n in numel) / sum(numel.values()))
    qc = json.loads((outs["compressed-tensors"] / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and "sparsity_config" not in qc
    by_width = {g["weights"]["num_bits"]: set(g["targets"]) for g in qc["config_groups"].values()}
    assert by_width == {b: {n for n, w in widths.items() if w == b} for b in set(widths.values())}
    a = AutoModelForCausalLM.from_pretrained(outs["dense"])
    b = AutoModelForCausalLM.from_pretrained(outs["compressed-tensors"])
    ids = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # each layer's weights sit on its own width's grid: at most 2**b distinct values per group of 16
    state = a.state_dict()
    for name, w in widths.items():
        W = state[f"{name}.weight"].reshape(-1, 16)
        assert max(len(torch.unique(row)) for row in W) <= 2**w
    # the dense output's grids file keeps each layer's width: eval and pack read them back
    from llmprune.checkpoint import Source, read_grids

    grids = read_grids(outs["dense"])
    assert {n: p.spec.wbits for n, p in grids.items()} == widths
    src = Source(outs["compressed-tensors"])
    for name in widths:
        W, params = src.weight(name)
        assert params.spec.wbits == widths[name]
        assert torch.equal(W.to(state[f"{name}.weight"].dtype), state[f"{name}.weight"])

    from llmprune.checkpoint_info import inspect_dir

    info = inspect_dir(outs["compressed-tensors"])
    assert {r["name"]: r["format"] for r in info["layers"]} == {
        n: f"pack-quantized int{w} g16" for n, w in widths.items()}
