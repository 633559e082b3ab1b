"""Hub ids stream from their snapshot in the Hugging Face cache (a cache laid out by the test: no network)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import tiny_model

import llmprune


@pytest.fixture
def hub_cache(tmp_path, tiny_tokenizer, monkeypatch):
    """A cache holding ``org/tiny`` (main -> one commit), as huggingface_hub lays out a download."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    tiny_model("llama").save_pretrained(snap)
    tiny_tokenizer.save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return snap


def test_a_hub_id_streams_from_its_cached_snapshot(hub_cache, tmp_path):
    before = {f.name: f.read_bytes() for f in hub_cache.iterdir() if f.is_file()}
    report = llmprune.compress("org/tiny", tmp_path / "out", nsamples=4, seqlen=32, device="cpu",
                               calib="shakespeare", progress=False, dtype="float32").to_dict()  # as in memory
    assert report["model"]["lazy"] is True and report["model"]["kind"] == "hub"
    assert report["model"]["source"] == "org/tiny"
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [f.name for f in (tmp_path / "out").glob("model*.safetensors")] == ["model.safetensors"]  # merged
    assert {f.name: f.read_bytes() for f in hub_cache.iterdir() if f.is_file()} == before
    eager = llmprune.compress(tiny_model("llama"), nsamples=4, seqlen=32, device="cpu", calib="shakespeare",
                              tokenizer=llmprune.load(hub_cache)[1], progress=False).module
    streamed, _ = llmprune.load(tmp_path / "out")
    for (name, a), b in zip(eager.state_dict().items(), streamed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_model_that_cannot_stream_says_so_with_the_memory(hub_cache, tmp_path, caplog):
    bin_dir = tmp_path / "bin"
    shutil.copytree(hub_cache, bin_dir)
    model, _ = llmprune.load(bin_dir)
    (bin_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")  # a .bin checkpoint, as older repos ship
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        llmprune.compress(bin_dir, tmp_path / "o", nsamples=4, seqlen=32, device="cpu", calib="shakespeare",
                          progress=False)
    assert "loaded whole, not streamed" in caplog.text and "GiB of host memory" in caplog.text
    assert ".bin" in caplog.text


def test_checkpoint_keys_without_the_base_prefix_stream_too(tmp_path, tiny_tokenizer):
    """GPT-2 hub checkpoints store ``h.0.attn...`` where the model has ``transformer.h.0.attn...``: the lazy
    loader maps them by transformers' own rules instead of refusing, and the output loads."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "gpt2"
    model = tiny_model("gpt2")
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    state = load_file(src / "model.safetensors")
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in state.items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    report = llmprune.compress(src, tmp_path / "out", nsamples=4, seqlen=32, device="cpu", calib="shakespeare",
                               progress=False).to_dict()
    assert report["model"]["lazy"] is True and report["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    eager = llmprune.compress(src, tmp_path / "eager", nsamples=4, seqlen=32, device="cpu", calib="shakespeare",
                              progress=False, lazy=False)
    a, _ = llmprune.load(tmp_path / "out")
    b, _ = llmprune.load(tmp_path / "eager")
    assert eager.global_sparsity == pytest.approx(report["global_sparsity"])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
