"""The working dtype of a command that writes a model: bfloat16 for float32 weights where bf16 arithmetic is
native, float32 (said in one warning line, with the flag that forces 16 bits) where this CPU emulates it."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import llmprune
from llmprune import loading
from llmprune.data import builtin_text_path

SMALL = dict(nsamples=4, seqlen=32, device="cpu", progress=False, sparsity=0.5)


@pytest.fixture()
def calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:20_000])
    return p


def test_the_measured_slowdown_is_a_positive_ratio(monkeypatch):
    monkeypatch.delenv("LLMPRUNE_CPU_BF16", raising=False)
    ratio = loading.cpu_bf16_slowdown()
    assert 0 < ratio < math.inf
    assert loading.bf16_pays("cpu") == (ratio <= loading.BF16_SLOWDOWN_OK)
    monkeypatch.setenv("LLMPRUNE_CPU_BF16", "0")
    assert not loading.bf16_pays("cpu")
    monkeypatch.setenv("LLMPRUNE_CPU_BF16", "1")
    assert loading.bf16_pays("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_fp32_weights_are_written_16_bit_only_where_bf16_is_native(native, tiny_model_dir, calib, tmp_path,
                                                                   monkeypatch, caplog):
    monkeypatch.setenv("LLMPRUNE_CPU_BF16", "1" if native else "0")
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        report = llmprune.compress(tiny_model_dir, tmp_path / "out", calib=str(calib), **SMALL)
    want = "bfloat16" if native else "float32"
    assert report.model["dtype"] == report.checkpoint["dtype"] == want
    model, _ = llmprune.load(tmp_path / "out")
    assert {p.dtype for p in model.parameters()} == {getattr(torch, want)}
    said = [r.getMessage() for r in caplog.records if "slower than float32" in r.getMessage()]
    assert len(said) == (0 if native else 1)
    assert native or "--dtype bfloat16 forces 16-bit output" in said[0]
    # --dtype bfloat16 is obeyed whatever the CPU, with the way out named where it is emulated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        forced = llmprune.compress(tiny_model_dir, tmp_path / "bf16", calib=str(calib), dtype="bfloat16", **SMALL)
    assert forced.checkpoint["dtype"] == "bfloat16"
    said = [r.getMessage() for r in caplog.records if "slower than float32" in r.getMessage()]
    assert len(said) == (0 if native else 1) and (native or "--dtype float32 runs much faster" in said[0])
