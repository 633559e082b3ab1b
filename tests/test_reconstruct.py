"""Block-wise reconstruction (--reconstruct): masks and patterns kept, quantized weights on their grid, the
block's error lowered on held-out tokens, the same result streamed or in memory, resumed or not, and bad
options refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from test_resume import _kill_after, _spawn, files, run, state
from test_resume import args as resume_args

from llmprune.compression import compress_model
from llmprune.pattern import parse_pattern
from llmprune.quant import on_grid
from llmprune.recipe import Recipe

SMALL = dict(device="cpu", batch_size=2, reconstruct_lr=1e-3)


def windows(n: int, seed: int) -> torch.Tensor:
    """Token windows of a repetitive random sequence (structure to learn, unlike uniform noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 320, (64,), generator=g)
    starts = torch.randint(0, 32, (n,), generator=g)
    return torch.stack([base[s:s + 32] for s in starts.tolist()])


def compressed(family: str = "llama", **kw) -> tuple[torch.nn.Module, dict]:
    model = tiny_model(family)
    report = compress_model(model, None, Recipe(**SMALL, **kw).resolve(), windows=windows(8, 0), progress=False)
    return model, report


def linear_weights(model: torch.nn.Module, report: dict) -> dict[str, torch.Tensor]:
    names = {r["name"] for r in report["layers"]}
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n in names}


@pytest.mark.parametrize("kw", [dict(sparsity=0.7), dict(pattern="2:4"), dict(pattern="2:4", sequential=False)])
def test_masks_and_patterns_are_kept_and_the_weights_move(kw):
    plain_model, plain = compressed(**kw)
    model, report = compressed(reconstruct=12, **kw)
    rec = report["reconstruction"]
    assert rec["reconstructed"] + len(rec["reverted"]) == 2 and rec["not_reconstructed"] == 0
    assert report["global_sparsity"] == pytest.approx(plain["global_sparsity"], abs=1e-9)
    before, after = linear_weights(plain_model, plain), linear_weights(model, report)
    pat = parse_pattern(kw.get("pattern", "unstructured"))
    for name, W in after.items():
        if pat is not None:  # every group of M holds at least M - N zeros
            groups = (W == 0).reshape(W.shape[0], -1, pat.m).sum(-1)
            assert bool((groups >= pat.m - pat.n).all()), name
        if name.startswith("model.layers.0."):  # block 0 saw the same inputs: the same mask, other weights
            assert torch.equal(W == 0, before[name] == 0), name
    moved = [n for n in after if n.startswith("model.layers.0.") and not torch.equal(after[n], before[n])]
    assert moved if "model.layers.0" not in rec["reverted"] else not moved
    for r in report["layers"]:  # the report counts what the model holds
        assert r["zeros"] == int((after[r["name"]] == 0).sum())


def test_reconstruct_zero_is_no_reconstruction_bit_for_bit():
    a, ra = compressed(sparsity=0.6)
    b, rb = compressed(sparsity=0.6, reconstruct=0)
    assert rb["reconstruction"] is None
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("target", ["dense", "compressed"])
def test_the_block_error_falls_on_held_out_tokens(target):
    """The training lowers the calibration loss it reports, and the model's output error on windows it never
    saw falls below the unreconstructed model's."""
    dense = tiny_model("llama")
    held = windows(8, 1)
    with torch.no_grad():
        ref = dense(held).logits

    def err(m):
        with torch.no_grad():
            return float((m(held).logits - ref).pow(2).mean())

    plain, _ = compressed(sparsity=0.7)
    model, report = compressed(sparsity=0.7, reconstruct=24, reconstruct_target=target)
    rec = report["reconstruction"]
    assert not rec["reverted"] and rec["loss_after_mean"] < rec["loss_before_mean"]
    assert all(e["steps"] == 24 and e["target"] == target for e in rec["blocks"].values())
    assert err(model) < err(plain)


def test_sublayer_granularity_trains_both_groups():
    model, report = compressed(sparsity=0.7, reconstruct=12, reconstruct_granularity="sublayer")
    plain, pr = compressed(sparsity=0.7)
    a, b = linear_weights(model, report), linear_weights(plain, pr)
    for part in ("self_attn.q_proj", "mlp.down_proj"):
        name = f"model.layers.0.{part}"
        assert not torch.equal(a[name], b[name]), name
    assert report["reconstruction"]["blocks"]["model.layers.0"]["granularity"] == "sublayer"


@pytest.mark.parametrize("kw", [dict(sparsity=0.5, wbits=4, group_size=32), dict(sparsity=0.0, wbits=3)])
def test_quantized_weights_stay_on_their_grid(kw):
    model = tiny_model("llama")
    grids: dict = {}
    report = compress_model(model, None, Recipe(**SMALL, reconstruct=16, **kw).resolve(), windows=windows(8, 0),
                            grids=grids, progress=False)
    weights = linear_weights(model, report)
    assert grids.keys() == weights.keys()
    for name, W in weights.items():
        assert on_grid(W, grids[name]), name


def test_moe_experts_are_trained_only_on_their_routed_tokens():
    """An expert no token is routed to keeps its (magnitude-pruned) weights; the routed ones move."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", vocab_size=320, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=128)

    def build():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(config).eval()
        gate = m.model.layers[0].mlp.gate
        v, u = torch.randn(64), torch.randn(64)  # logits (a, -a, b, -b, 0): expert 4 is never in the top 2
        gate.weight.data.copy_(torch.stack([v, -v, u, -u, torch.zeros(64)]))
        return m

    def run_it(**kw):
        m = build()
        compress_model(m, None, Recipe(**SMALL, sparsity=0.5, **kw).resolve(), windows=windows(8, 0), progress=False)
        return m.model.layers[0].mlp.experts

    plain, rec = run_it(), run_it(reconstruct=12)
    for p in ("gate_up_proj", "down_proj"):
        a, b = getattr(plain, p).data, getattr(rec, p).data
        assert torch.equal(a[4], b[4]), p  # routed no token: untouched
        assert not torch.equal(a[0], b[0]), p


@pytest.fixture()
def recon_args(sharded):
    def make(out, *extra):
        return resume_args(sharded, out, "--reconstruct", "6", "--reconstruct-lr", "1e-3", *extra)

    return make


def test_streamed_equals_in_memory_and_resume_is_byte_identical(recon_args, tmp_path):
    lazy, eager = tmp_path / "lazy", tmp_path / "eager"
    assert run(recon_args(lazy)) == 0
    assert run(recon_args(eager, "--no-lazy")) == 0
    a, b = state(lazy), state(eager)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((lazy / "llmprune.json").read_text())
    assert len(report["reconstruction"]["blocks"]) == 6
    out = tmp_path / "resumed"
    done = _kill_after(_spawn(recon_args(out)), tmp_path / "resumed.partial" / "journal.json", 3)
    assert done < 6 and not out.exists()
    proc = subprocess.run([sys.executable, "-m", "llmprune", *recon_args(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert files(out) == files(lazy)
    again = json.loads((out / "llmprune.json").read_text())["reconstruction"]
    assert again["blocks"].keys() == report["reconstruction"]["blocks"].keys()  # journaled, not claimed anew


@pytest.mark.parametrize(("flags", "message"), [
    (["--reconstruct", "4", "--reconstruct-lr", "0"], "reconstruct_lr 0.0 must be > 0"),
    (["--reconstruct", "--reconstruct-lr", "-1"], "reconstruct_lr -1.0 must be > 0"),  # alone: the default steps
    (["--reconstruct", "4", "--sparsity", "0", "--drop-experts", "0.25"], "changes no weight"),
])
def test_bad_reconstruction_options_are_one_line_errors(sharded, tmp_path, capsys, flags, message):
    assert run(resume_args(sharded, tmp_path / "o", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_negative_steps_are_refused_in_a_recipe():
    from llmprune.errors import UsageError
    from llmprune.recipe import recipe_from_dict

    with pytest.raises(UsageError, match="reconstruct -1 must be >= 0"):
        recipe_from_dict({"reconstruct": {"steps": -1}})
    with pytest.raises(UsageError, match="unknown key reconstruct.step"):
        recipe_from_dict({"reconstruct": {"step": 4}})
    assert recipe_from_dict({"reconstruct": True}).reconstruct > 0


def test_the_python_api_takes_the_yaml_mapping(tiny_tokenizer):
    import llmprune

    report = llmprune.compress(tiny_model("llama"), None, {"sparsity": 0.5, "calib": "shakespeare", "nsamples": 4,
                                                           "seqlen": 32, "device": "cpu",
                                                           "reconstruct": {"steps": 2, "lr": 1e-3}},
                               tokenizer=tiny_tokenizer, progress=False)
    rec = report.reconstruction
    assert rec["spec"]["steps"] == 2 and rec["spec"]["lr"] == 1e-3
    assert all(e["steps"] == 2 for e in rec["blocks"].values()) and len(rec["blocks"]) == 2
