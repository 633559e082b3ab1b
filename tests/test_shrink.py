"""Structured pruning: OBS beats l1 and wanda on the consumer's error; a shrunk model equals the original
with the removed channels/heads zeroed and the same updates applied; it loads and generates."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_solvers import correlated_layer

import llmprune
from llmprune.arch import LAYOUTS, find_blocks, get_weight, set_weight
from llmprune.cli import main
from llmprune.solvers.group_obs import obs_remove, score_remove
from llmprune.solvers.result import relative_error

CALIB = dict(calib="shakespeare", nsamples=4, seqlen=32, device="cpu", progress=False)
HEADS = {"llama", "qwen2", "gemma3_text"}


def test_obs_removal_beats_l1_and_wanda_on_correlated_inputs():
    for seed in range(3):
        W, H = correlated_layer(48, 96, seed=seed)
        producers = [torch.randn(96, 32, generator=torch.Generator().manual_seed(seed))]
        groups = torch.arange(96).unsqueeze(1)
        _, W_obs = obs_remove(W, H, groups, 32, chunk=4)
        errs = {"obs": relative_error(W, W_obs, H)}
        for method in ("l1", "wanda"):
            removed = score_remove(W, H, producers, groups, 32, method)
            W_m = W.clone()
            W_m[:, removed] = 0
            errs[method] = relative_error(W, W_m, H)
        assert int((W_obs.abs().sum(0) == 0).sum()) == 32
        assert errs["obs"] < 0.5 * errs["l1"] and errs["obs"] < 0.8 * errs["wanda"], errs


def test_head_groups_respect_the_kv_quota():
    W, H = correlated_layer(16, 64, seed=1)
    groups = torch.arange(64).view(8, 8)  # 8 heads of 8 columns, 2 KV groups of 4

    def allowed(removed):
        return (removed.view(2, 4).sum(1) < 1).repeat_interleave(4)

    removed, W_new = obs_remove(W, H, groups, 2, allowed=allowed)
    assert sorted(int(h) // 4 for h in removed) == [0, 1]  # one from each KV group
    assert torch.equal(W_new[:, groups[removed].reshape(-1)], torch.zeros(16, 16))


def _masked_reference(original, shrunk, report, family):
    """The original model with the removed channels/heads zeroed and the shrunk model's updates applied."""
    ref = copy.deepcopy(original)
    lay = LAYOUTS[family]
    _, ref_blocks = find_blocks(ref)
    _, new_blocks = find_blocks(shrunk)
    for info, rb, nb in zip(report["blocks"], ref_blocks, new_blocks, strict=True):
        if "channels_removed" in info:
            gone = torch.tensor(info["channels_removed"])
            keep = torch.ones(get_weight(rb.get_submodule(lay.mlp_out)).shape[1], dtype=torch.bool)
            keep[gone] = False
            W = torch.zeros_like(get_weight(rb.get_submodule(lay.mlp_out)))
            W[:, keep] = get_weight(nb.get_submodule(lay.mlp_out))
            set_weight(rb.get_submodule(lay.mlp_out), W)
            for name in lay.mlp_in:
                mod = rb.get_submodule(name)
                Wi = get_weight(mod).clone()
                Wi[gone] = 0
                set_weight(mod, Wi)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.data[gone] = 0
        if "heads_removed" in info:
            o = rb.get_submodule(lay.o)
            hd = shrunk.config.head_dim
            cols = torch.ones(get_weight(o).shape[1], dtype=torch.bool)
            for h in info["heads_removed"]:
                cols[h * hd:(h + 1) * hd] = False
            W = torch.zeros_like(get_weight(o))
            W[:, cols] = get_weight(nb.get_submodule(lay.o))
            set_weight(o, W)
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "opt", "gpt_neox"])
@pytest.mark.parametrize("method", ["obs", "wanda"])
def test_shrunk_model_equals_the_masked_original(family, method, tiny_tokenizer):
    original = tiny_model(family)
    shrunk = copy.deepcopy(original)
    heads = 0.5 if family in HEADS else 0.0
    report = llmprune.shrink(shrunk, tokenizer=tiny_tokenizer, mlp=0.5, heads=heads, method=method, align=8,
                                 **CALIB)
    assert report["params"]["after"] < report["params"]["before"]
    ref = _masked_reference(original, shrunk, report, family)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = shrunk(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and it is not the original: something was removed
        assert not torch.allclose(original(input_ids=ids).logits, a, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt", "gpt_neox", "gpt2"])
def test_shrunk_model_loads_and_generates(family, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    d = tmp_path / "src"
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    heads = 0.5 if family in HEADS else 0.0
    report = llmprune.shrink(d, tmp_path / "out", mlp=0.25, heads=heads, drop_blocks=1, align=8, **CALIB)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    config = loaded.config
    _, blocks = find_blocks(loaded)
    assert len(blocks) == len(find_blocks(model)[1]) - 1 == report["sizes"]["blocks"][1]
    lay = LAYOUTS[family]
    assert get_weight(blocks[0].get_submodule(lay.mlp_out)).shape[1] == report["sizes"]["mlp_channels"][1]
    if heads:
        assert get_weight(blocks[0].get_submodule(lay.q)).shape[0] == config.num_attention_heads * config.head_dim
        assert config.num_attention_heads < model.config.num_attention_heads
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == len(blocks)
    out = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_bad_shrink_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    def run(*args) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["shrink", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calib", "shakespeare",
                  *map(str, args)])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert exc.value.code == 2 and len(err) == 1, err
        return err[0]

    assert "outside [0, 1)" in run("--mlp", "1.2")
    assert "leaves no MLP channel" in run("--mlp", "0.9", "--align", "64")
    assert "every query head" in run("--heads", "0.9")
    assert "has 2 blocks" in run("--drop-blocks", "2")
    assert not (tmp_path / "o").exists()


def test_heads_of_a_family_that_derives_head_size_are_refused(tiny_tokenizer, tmp_path):
    with pytest.raises(llmprune.UsageError, match="opt derives its head size"):
        llmprune.shrink(tiny_model("opt"), tokenizer=tiny_tokenizer, heads=0.25, **CALIB)


def test_bench_speed_prints_both_models(tiny_model_dir, tmp_path, capsys):
    llmprune.shrink(tiny_model_dir, tmp_path / "s", mlp=0.5, align=8, **CALIB)
    with pytest.raises(SystemExit) as exc:
        main(["bench-speed", str(tiny_model_dir), str(tmp_path / "s"), "--tokens", "16", "--new-tokens", "4",
              "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert exc.value.code == 0 and len(out) == 3 and "prefill tok/s" in out[0]


def test_shrink_then_wbits_gives_a_smaller_quantized_model_that_loads(tiny_tokenizer, tmp_path):
    """--wbits after shrinking, in the same run: every linear of the smaller model on a 4-bit grid (at most 16
    distinct values in each row's 32-column group), the report both the shrink's and the quantization's; a
    group size the shrunk widths cannot hold is refused before any work."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "src"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    with pytest.raises(llmprune.UsageError, match="does not divide the shrunk model's 72 MLP channels"):
        llmprune.shrink(d, tmp_path / "out", mlp=0.25, align=8, wbits=4, group_size=16, **CALIB)
    assert not (tmp_path / "out").exists()
    report = llmprune.shrink(d, tmp_path / "out", mlp=1 / 3, heads=0.5, align=8, wbits=4, group_size=32, **CALIB)
    assert report["sizes"]["mlp_channels"] == [96, 64]
    assert report["sizes"]["mlp_channels"][1] < report["sizes"]["mlp_channels"][0]
    assert report["layers"] and all(x["bits"] > 4 for x in report["layers"])  # 4-bit codes plus the scales
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.intermediate_size == report["sizes"]["mlp_channels"][1]
    for name, mod in loaded.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            groups = mod.weight.detach().reshape(mod.weight.shape[0], -1, 32)
            assert max(len(torch.unique(g)) for row in groups for g in row) <= 16, name
    out = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_shrink_refuses_a_recipe_that_prunes_inside_layers(tiny_model_dir, tmp_path):
    with pytest.raises(llmprune.UsageError, match="sparsity in the recipe prunes inside layers"):
        llmprune.shrink(tiny_model_dir, tmp_path / "o", mlp=0.25, sparsity=0.5, **CALIB)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shrink_streamed_from_disk_equals_the_whole_model_run(family, tiny_tokenizer, tmp_path):
    """The default for a safetensors directory: one block in memory at a time, the output assembled with the
    kept blocks renumbered; the same tensors (under the input's own keys), config and report as loading the
    model whole; with --wbits, the same quantized model."""
    from safetensors.torch import load_file

    d = tmp_path / "src"
    tiny_model(family).save_pretrained(d, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) > 1
    heads = 0.5 if family in HEADS else 0.0
    opts = dict(mlp=0.25, heads=heads, drop_blocks=1, align=8, **CALIB)
    for wbits in (None, 4):
        q = dict(wbits=wbits, group_size=8) if wbits else {}
        one = llmprune.shrink(d, tmp_path / f"whole{wbits}", lazy=False, **opts, **q)
        two = llmprune.shrink(d, tmp_path / f"lazy{wbits}", **opts, **q)
        assert two["model"]["lazy"] and two["kept_blocks"] == one["kept_blocks"] and two["sizes"] == one["sizes"]
        assert one["checkpoint"]["bytes"] == pytest.approx(two["checkpoint"]["bytes"], rel=0.01)  # both report it
        assert [b["cosine"] for b in two["blocks"]] == pytest.approx([b["cosine"] for b in one["blocks"]])
        w1, w2 = ({k: v for f in sorted((tmp_path / f"{n}{wbits}").glob("*.safetensors")) for k, v in
                   load_file(f).items()} for n in ("whole", "lazy"))
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
        c1, c2 = (json.loads((tmp_path / f"{n}{wbits}" / "config.json").read_text()) for n in ("whole", "lazy"))
        assert {k: v for k, v in c1.items() if k != "dtype"} == {k: v for k, v in c2.items() if k != "dtype"}
    assert not list(tmp_path.glob(".*"))  # no temporary directory left beside the outputs


def test_an_interrupted_streamed_shrink_resumes_to_the_same_output(tiny_tokenizer, tmp_path, monkeypatch, caplog):
    """Each shrunk block is journaled in OUT.partial/ as it is done; a failure keeps them, and the re-run
    resizes those blocks, reads them back, shrinks only the rest and writes the output an uninterrupted run
    writes. With --wbits, a failure in the quantization stage keeps the shrunk model, and the re-run only
    quantizes."""
    import logging

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import llmprune.api
    import llmprune.shrinking as shrinking

    d = tmp_path / "src"
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(d, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(d)
    opts = dict(mlp=1 / 3, heads=0.5, drop_blocks=1, align=8, **CALIB)

    def tensors(out):
        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}

    real = shrinking.shrink_block
    calls = []

    def fail_at_block_2(block, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # heads, then channels, per block: the third block's heads
            raise RuntimeError("injected")
        return real(block, *args, **kwargs)

    for wbits in (None, 4):
        q = dict(wbits=wbits, group_size=8) if wbits else {}
        ref = llmprune.shrink(d, tmp_path / f"ref{wbits}", **opts, **q)
        out = tmp_path / f"out{wbits}"
        calls.clear()
        monkeypatch.setattr(shrinking, "shrink_block", fail_at_block_2)
        with pytest.raises(RuntimeError, match="injected"):
            llmprune.shrink(d, out, **opts, **q)
        monkeypatch.setattr(shrinking, "shrink_block", real)
        shrunk_dir = out if wbits is None else tmp_path / f".{out.name}.shrunk"
        partial = tmp_path / f"{shrunk_dir.name}.partial"
        assert not out.exists() and sorted(json.loads((partial / "journal.json").read_text())["blocks"]) == ["0", "1"]
        with caplog.at_level(logging.INFO, logger="llmprune"):
            again = llmprune.shrink(d, out, **opts, **q)
        assert "2 blocks already done" in caplog.text
        caplog.clear()
        assert again["kept_blocks"] == ref["kept_blocks"] and again["blocks"] == ref["blocks"]
        a, b = tensors(tmp_path / f"ref{wbits}"), tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not partial.exists()
    # --wbits: the quantization stage fails after the shrink finished; the re-run does not shrink again
    from llmprune import pipeline

    monkeypatch.setattr(pipeline, "compress_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("q")))
    with pytest.raises(RuntimeError, match="q"):
        llmprune.shrink(d, tmp_path / "late", **opts, wbits=4, group_size=8)
    monkeypatch.undo()
    assert (tmp_path / ".late.shrunk" / "llmprune.json").is_file()
    monkeypatch.setattr(shrinking, "shrink_block", lambda *a, **k: pytest.fail("shrunk again"))
    with caplog.at_level(logging.INFO, logger="llmprune"):
        llmprune.shrink(d, tmp_path / "late", **opts, wbits=4, group_size=8)
    assert "already shrunk" in caplog.text
    a, b = tensors(tmp_path / "ref4"), tensors(tmp_path / "late")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".late.shrunk").exists()
