"""What a run leaves on disk and on the terminal: a small model's output is one weights file, every file gets
the mode the umask gives, progress=False draws no bar (ours or transformers'), the log names the calibration."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import llmprune
from llmprune.checkpoint import TensorReader, merge_files, save_tensors
from llmprune.data import builtin_text_path

OPTS = dict(nsamples=4, seqlen=32, device="cpu", progress=False)


@pytest.fixture
def calib_txt(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_are_one_weights_file_with_the_umask_mode(mask, tiny_model_dir, calib_txt, tmp_path):
    """Streamed (lazy, per-block files merged on publish) and whole-model (transformers' save_pretrained,
    whose safetensors writer makes 0600 files) runs alike."""
    old = os.umask(mask)
    try:
        for lazy in (True, False):
            out = tmp_path / f"out-{lazy}"
            report = llmprune.compress(tiny_model_dir, out, calib=str(calib_txt), lazy=lazy, **OPTS)
            assert report.model.get("lazy", False) is lazy
            assert sorted(f.name for f in out.glob("*.safetensors")) == ["model.safetensors"], lazy
            assert not (out / "model.safetensors.index.json").exists()
            assert report.checkpoint["bytes"] == (out / "model.safetensors").stat().st_size
            modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()}
            assert set(modes.values()) == {oct(0o666 & ~mask)}, modes
    finally:
        os.umask(old)
    a, b = (TensorReader(tmp_path / f"out-{lazy}") for lazy in (True, False))
    assert set(a.keys()) <= set(b.keys())  # the whole-model file may also hold tied lm_head
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def test_merged_shards_hold_every_tensor_and_redo_the_same(tmp_path):
    torch.manual_seed(0)
    parts = [{f"b{i}.w{j}": torch.randn(16, 8, dtype=torch.bfloat16 if j else torch.float32) for j in range(3)}
             for i in range(5)]
    sources = []
    for i, tensors in enumerate(parts):
        sources.append(f"part-{i}.safetensors")
        save_tensors(tensors, tmp_path / sources[-1], metadata={"format": "pt"})
    one = sum((tmp_path / s).stat().st_size for s in sources[:2])  # about two parts per shard
    names = merge_files(tmp_path, sources, max_shard_bytes=one)
    assert names == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for p in parts for t in p.values())
    first = {n: (tmp_path / n).read_bytes() for n in names}
    for s in sources:
        (tmp_path / s).rename(tmp_path / f"kept-{s}")  # the merged files stand on their own
    reader = TensorReader(tmp_path)
    assert sorted(reader.keys()) == sorted(k for p in parts for k in p)
    assert all(torch.equal(reader.get(k), t) for p in parts for k, t in p.items())
    reader.close()
    for s in sources:
        (tmp_path / f"kept-{s}").rename(tmp_path / s)
    assert merge_files(tmp_path, sources, max_shard_bytes=one) == names
    assert {n: (tmp_path / n).read_bytes() for n in names} == first
    assert merge_files(tmp_path, sources) == ["model.safetensors"]  # everything fits in one
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_progress_false_draws_no_bar_at_all(tiny_model_dir, calib_txt, tmp_path, capfd):
    """No tqdm bar on stderr: not ours, not transformers' loading or writing of checkpoint shards; they are
    back on afterwards."""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    llmprune.compress(tiny_model_dir, tmp_path / "whole", calib=str(calib_txt), lazy=False, **OPTS)
    llmprune.compress(tiny_model_dir, tmp_path / "lazy", calib=str(calib_txt), **OPTS)
    llmprune.evaluate(tmp_path / "whole", str(calib_txt), seqlen=32, max_windows=2, device="cpu", progress=False)
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err
    assert hf_logging.is_progress_bar_enabled()
    llmprune.compress(tiny_model_dir, tmp_path / "bars", calib=str(calib_txt), lazy=False,
                      **(OPTS | {"progress": True}))
    assert "it/s" in capfd.readouterr().err  # the same run with progress=True does draw them


def test_the_log_names_the_calibration_source(tiny_model_dir, calib_txt, tmp_path, caplog):
    """A streamed run cuts its windows before compressing: the log line says where they came from."""
    with caplog.at_level(logging.INFO, logger="llmprune"):
        report = llmprune.compress(tiny_model_dir, tmp_path / "o", calib=str(calib_txt), **OPTS)
    line = next(r.getMessage() for r in caplog.records if "calibrated on" in r.getMessage())
    assert "calibrated on 4 x 32 tokens (file:" in line and "given" not in line
    assert report.calibration["source"].startswith("file:") and report.calibration["seed"] == 0
