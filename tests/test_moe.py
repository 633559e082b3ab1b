"""Mixture-of-experts models: every expert compressed on its own routed tokens, in the input's layout."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TINY_MOE, VOCAB, tiny_model
from safetensors import safe_open

import llmprune
from llmprune.compression import compress_model
from llmprune.engine import Stream
from llmprune.errors import UsageError
from llmprune.hessian import HessianCollector
from llmprune.recipe import Recipe
from llmprune.targets import block_targets, on_device

FAMILIES = list(TINY_MOE)
# float32 outputs: the tests compare them with in-memory fp32 models and transformers loads of them
OPTS = dict(nsamples=8, seqlen=32, device="cpu", calib="shakespeare", progress=False, dtype="float32")


def windows(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def expert_matrices(model) -> dict[str, torch.Tensor]:
    """Every expert's (out, in) matrix, by view name, of every block."""
    out = {}
    for i, block in enumerate(model.model.layers):
        for name, mod in block_targets(block).items():
            if ".experts." in name:
                out[f"{i}.{name}"] = mod.weight.data
    return out


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tiny_tokenizer):
    """family -> a tiny MoE saved by transformers (Mixtral and Qwen: one tensor per expert on disk)."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        tiny_model(family).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        out[family] = d
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_routed_forward_equals_the_model(family):
    """Through the engine, experts routed through their views sublayer by sublayer: the model's logits."""
    model = tiny_model(family)
    ids = windows(4, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    def on_block(i, block, block_pass):
        with on_device(block, block_targets(block)) as lin:
            block_pass.sequential(lin, lambda name, xs: None)

    stream = Stream(model, [ids[:2], ids[2:]], "cpu", progress=False)
    stream.run(on_block)
    got = torch.cat([stream.logits(b) for b in range(2)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sequential", [True, False])
def test_every_expert_matrix_has_exactly_the_sparsity(family, sequential):
    model = tiny_model(family)
    report = compress_model(model, None, Recipe(sparsity=0.5, sequential=sequential, device="cpu",
                                                min_expert_tokens=1).resolve(), windows=windows(), progress=False)
    mats = expert_matrices(model)
    assert len(mats) == 2 * 4 * 3  # blocks x experts x (gate, up, down)
    for name, W in mats.items():
        assert int((W == 0).sum()) == W.numel() // 2, name
    names = {r["name"] for r in report["layers"]}
    assert all(f"model.layers.{i}.mlp.experts.{e}.{m}" in names
               for i in range(2) for e in range(4) for m in ("gate_proj", "up_proj", "down_proj"))
    # the report's global sparsity covers attention and experts: every weight meant to be pruned
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    total = sum(r["shape"][0] * r["shape"][1] for r in report["layers"])
    assert report["pruned_params"] == total
    attention = sum(W.numel() for n, W in model.named_parameters() if "self_attn" in n and n.endswith("proj.weight"))
    assert total > attention + sum(W.numel() for W in mats.values()) - 1
    routers = report["left_dense"]["routers"]
    assert routers and all(".mlp.gate" in r or ".mlp.router" in r or "shared_expert_gate" in r for r in routers)
    if family == "qwen2_moe":  # the shared expert is an ordinary MLP: pruned
        assert "model.layers.0.mlp.shared_expert.down_proj" in names


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_nm_pattern_holds_in_every_expert(family):
    model = tiny_model(family)
    compress_model(model, None, Recipe(pattern="2:4", device="cpu", min_expert_tokens=1).resolve(), windows=windows(),
                   progress=False)
    for name, W in expert_matrices(model).items():
        assert ((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name


def test_an_experts_hessian_is_from_exactly_the_tokens_routed_to_it():
    model = tiny_model("mixtral")
    block = model.model.layers[0]
    ids = windows(2, 16)
    seen = {}
    block.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.setdefault("x", out.detach()))
    lin = block_targets(block)
    with torch.no_grad(), on_device(block, lin) as lin, HessianCollector(lin) as hc:
        model(input_ids=ids)
    x = seen["x"].reshape(-1, 64)
    router = block.mlp.gate
    probs = torch.softmax(x @ router.weight.t(), -1)
    top = probs.topk(2, dim=-1).indices
    for e in range(4):
        xe = x[(top == e).any(-1)]
        assert hc.n[hc.leader[f"mlp.experts.{e}.gate_proj"]] == xe.shape[0]
        torch.testing.assert_close(hc.hessian(f"mlp.experts.{e}.up_proj"), 2 / xe.shape[0] * xe.t() @ xe,
                                   atol=1e-5, rtol=1e-4)


def test_experts_with_too_few_tokens_are_pruned_by_magnitude_and_named(caplog):
    model = tiny_model("qwen3_moe")
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        report = compress_model(model, None, Recipe(sparsity=0.5, device="cpu", min_expert_tokens=10**6).resolve(),
                                windows=windows(), progress=False)
    fallback = report["experts"]["fallback"]
    assert len(fallback) == 2 * 4 * 3
    assert all(v["method"] == "magnitude" and 0 <= v["tokens"] < 10**6 for v in fallback.values())
    assert "pruned by magnitude" in caplog.text and "mlp.experts.0.gate_proj (" in caplog.text
    for W in expert_matrices(model).values():  # still pruned, exactly
        assert int((W == 0).sum()) == W.numel() // 2
    attn = [r for r in report["layers"] if "self_attn" in r["name"]]
    assert all(r["method"] == "sparsegpt" for r in attn)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lazy", [False, True])
def test_saved_moe_loads_in_transformers_with_the_pruned_logits(family, lazy, moe_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    src = moe_dirs[family]
    before = {}
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            before = {k: fh.get_tensor(k) for k in fh.keys()}
    report = llmprune.compress(src, tmp_path / "out", lazy=lazy, sparsity=0.5, min_expert_tokens=1, **OPTS)
    assert report.to_dict()["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:  # streamed too: one file
        keys = set(fh.keys())
    block0 = {k for k in before if k.startswith("model.layers.0.")}
    assert block0 <= keys  # the input's own layout and keys (per-expert tensors stay per expert)
    for f in src.glob("*.safetensors"):  # the input is untouched
        with safe_open(str(f), "pt") as fh:
            assert all(torch.equal(fh.get_tensor(k), before[k]) for k in fh.keys())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    mats = expert_matrices(loaded)
    assert all(int((W == 0).sum()) == W.numel() // 2 for W in mats.values())
    ids = windows(2, 16, seed=1)
    in_memory = tiny_model(family)
    compress_model(in_memory, None, Recipe(sparsity=0.5, device="cpu", min_expert_tokens=1, calib="shakespeare",
                                           nsamples=8, seqlen=32).resolve(), windows=_calib(src), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def _calib(src):
    """The calibration windows ``compress`` cut for OPTS, cut again the same way."""
    from llmprune.calibration import calibration_set
    from llmprune.loading import load_tokenizer

    tok = load_tokenizer(str(src))
    calib = Recipe(calib="shakespeare", nsamples=8, seqlen=32).resolve().calibration
    return calibration_set(tok, tiny_model("llama"), calib)[0]


def test_compressed_tensors_output_of_fused_experts_is_refused(moe_dirs, tmp_path):
    with pytest.raises(UsageError, match="compressed-tensors"):
        llmprune.compress(moe_dirs["mixtral"], tmp_path / "o", wbits=4, format="compressed-tensors", **OPTS)
    assert not (tmp_path / "o").exists()


def _route_without(model, dropped: dict[int, list[int]]) -> None:
    """Give the dropped experts -inf router logits: the original model, those experts never chosen."""
    real_linear = torch.nn.functional.linear
    for i, block in enumerate(model.model.layers):
        router = getattr(block.mlp, "gate", None) or block.mlp.router
        mask = torch.zeros(router.weight.shape[0])
        mask[dropped[i]] = float("-inf")

        def forward(hidden, _orig=router.forward, _w=router.weight, _m=mask):
            def masked(x, w, b=None):
                out = real_linear(x, w, b)
                return out + _m if w is _w else out

            torch.nn.functional.linear = masked  # the routers call F.linear on their weight
            try:
                return _orig(hidden)
            finally:
                torch.nn.functional.linear = real_linear

        router.forward = forward


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("lazy", [False, True])
def test_drop_experts_gives_the_model_with_those_experts_routed_minus_infinity(family, lazy, moe_dirs, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    report = llmprune.compress(moe_dirs[family], tmp_path / "out", lazy=lazy, sparsity=0.0, drop_experts=0.5,
                               **OPTS).to_dict()
    dropped = {int(k.split(".")[2]): v["dropped"] for k, v in report["experts"]["dropped"].items()}
    assert sorted(dropped) == [0, 1] and all(len(v) == 2 for v in dropped.values())
    config = AutoConfig.from_pretrained(tmp_path / "out")
    key = "num_local_experts" if family != "qwen2_moe" else "num_experts"
    assert getattr(config, key) == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # no custom code
    original = tiny_model(family)
    _route_without(original, dropped)
    ids = windows(2, 16, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, original(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_drop_experts_refuses_dense_models_and_too_many(moe_dirs, tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="has none"):
        llmprune.compress(tiny_model_dir, tmp_path / "a", drop_experts=0.5, **OPTS)
    with pytest.raises(UsageError, match="fewer than the 2"):
        llmprune.compress(moe_dirs["mixtral"], tmp_path / "b", drop_experts=0.75, **OPTS)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_drop_then_prune_every_kept_expert(moe_dirs, tmp_path):
    report = llmprune.compress(moe_dirs["qwen3_moe"], tmp_path / "o", sparsity=0.5, drop_experts=0.25,
                               min_expert_tokens=1, **OPTS).to_dict()
    names = {r["name"] for r in report["layers"]}
    assert {f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(3)} <= names
    assert "model.layers.0.mlp.experts.3.down_proj" not in names
    assert report["left_dense"]["never_called"] == []
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_packed_24_moe_loads_with_the_same_logits_experts_dense_and_said(moe_dirs, tmp_path, caplog):
    from llmprune import api

    api.compress(moe_dirs["mixtral"], tmp_path / "c", pattern="2:4", min_expert_tokens=1, **OPTS)
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        api.pack(tmp_path / "c", tmp_path / "p", pattern="2:4", progress=False)
    assert "mixture-of-experts tensors" in caplog.text
    dense, _ = llmprune.load(tmp_path / "c")
    packed, _ = llmprune.load(tmp_path / "p")
    ids = windows(1, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_shrink_drops_experts_with_the_cli_and_refuses_mlp_on_moe(moe_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from llmprune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["shrink", str(moe_dirs["qwen2_moe"]), "--out", str(tmp_path / "s"), "--drop-experts", "0.5",
              "--calib", "shakespeare", "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--dtype", "float32"])
    assert exc.value.code in (0, None)
    assert "experts 4 -> 2 per MoE layer" in capsys.readouterr().out
    data = json.loads((tmp_path / "s" / "llmprune.json").read_text())
    dropped = {int(k.split(".")[2]): v["dropped"] for k, v in data["dropped_experts"].items()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    original = tiny_model("qwen2_moe")
    _route_without(original, dropped)
    ids = windows(2, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, original(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="mixture of experts"):
        llmprune.shrink(moe_dirs["qwen2_moe"], tmp_path / "m", mlp=0.25, **OPTS)


def test_a_lazy_moe_run_resumes_after_a_failure_with_dropped_experts(moe_dirs, tmp_path, monkeypatch):
    """Block 0 is written with 2 of 4 experts; the resumed run reads it back into the 4-expert skeleton."""
    import llmprune.resume as resume

    real = resume.save_tensors
    calls = {"n": 0}

    def fail_second(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    opts = dict(sparsity=0.5, drop_experts=0.5, min_expert_tokens=1, **OPTS)
    monkeypatch.setattr(resume, "save_tensors", fail_second)
    with pytest.raises(UsageError):
        llmprune.compress(moe_dirs["mixtral"], tmp_path / "o", **opts)
    assert (tmp_path / "o.partial").is_dir() and not (tmp_path / "o").exists()
    monkeypatch.setattr(resume, "save_tensors", real)
    llmprune.compress(moe_dirs["mixtral"], tmp_path / "o", **opts)
    llmprune.compress(moe_dirs["mixtral"], tmp_path / "ref", **opts)
    name = "model.safetensors"  # the streamed output, merged into one file
    with safe_open(str(tmp_path / "o" / name), "pt") as a, safe_open(str(tmp_path / "ref" / name), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
