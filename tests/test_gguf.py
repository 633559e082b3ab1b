"""GGUF inputs: the file parsed once per run, tensors streamed block by block (dequantized on read, renamed
and un-permuted as transformers does), and written in bf16 like every other fp32 source; size figures of
compress, inspect, pack and sweep count alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model
from gguf_util import write_llama_gguf

import llmprune
from llmprune import ggufio
from llmprune.cli import cli
from llmprune.data import builtin_text_path
from llmprune.loading import load_model

pytest.importorskip("gguf")
SMALL = dict(nsamples=4, seqlen=32, device="cpu", progress=False)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("gguf-calib") / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


def weights(directory: Path) -> dict[str, torch.Tensor]:
    model, _ = llmprune.load(directory)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_equals_transformers_gguf_load(tmp_path):
    """Q8_0 weights, q/k stored in llama.cpp's row order: the logits are transformers' own GGUF load's."""
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(tiny_model("llama", seed=1), tmp_path / "tiny.gguf", qtype="Q8_0")
    mine, _, _ = load_model(str(path), progress=False)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mine(ids).logits, ref(ids).logits)
    assert mine.dtype == torch.float32  # loading for use keeps what the file dequantizes to


def test_compress_parses_the_file_once_and_streams_it_like_a_directory(tmp_path, tiny_tokenizer, calib,
                                                                       monkeypatch):
    import gguf
    from transformers import modeling_gguf_pytorch_utils as mg

    model = tiny_model("llama")
    path = write_llama_gguf(model, tmp_path / "tiny.gguf")
    model.save_pretrained(tmp_path / "dir")
    tiny_tokenizer.save_pretrained(tmp_path / "dir")
    parses = {"GGUFReader": 0, "load_gguf_checkpoint": 0}
    reader_init, load = gguf.GGUFReader.__init__, mg.load_gguf_checkpoint

    def counted_init(self, *args, **kwargs):
        parses["GGUFReader"] += 1
        reader_init(self, *args, **kwargs)

    def counted_load(*args, **kwargs):
        parses["load_gguf_checkpoint"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted_init)
    monkeypatch.setattr(mg, "load_gguf_checkpoint", counted_load)
    ggufio._FILES.clear()
    report = llmprune.compress(path, tmp_path / "from-gguf", tokenizer=tiny_tokenizer, calib=str(calib),
                               sparsity=0.5, **SMALL)
    # transformers 5.16 (the lowest supported) still opens its own GGUFReaders beside ours (5 readers and 1-2
    # metadata loads, seen in CI's lowest-versions job): the one-parse claim holds from 5.17 on
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.17"):
        assert parses == {"GGUFReader": 1, "load_gguf_checkpoint": 1}
    assert report.model["lazy"] is True and report.model["kind"] == "gguf"
    assert report.model["dtype"] == report.checkpoint["dtype"] == "bfloat16"
    ref = llmprune.compress(tmp_path / "dir", tmp_path / "from-dir", calib=str(calib), sparsity=0.5, **SMALL)
    want, got = weights(tmp_path / "from-dir"), weights(tmp_path / "from-gguf")
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert all(v.dtype == torch.bfloat16 for v in got.values() if v.is_floating_point())
    assert report.global_sparsity == ref.global_sparsity
    # --dtype float32 keeps fp32 (and says so)
    r32 = llmprune.compress(path, tmp_path / "fp32", tokenizer=tiny_tokenizer, calib=str(calib), sparsity=0.5,
                            dtype="float32", **SMALL)
    assert r32.checkpoint["dtype"] == "float32" and r32.checkpoint["bits_per_weight"] == 32


def test_size_figures_agree_across_commands(tiny_model_dir, calib, tmp_path):
    """One fp32 model: compress writes bf16 (16 bits/weight, as inspect counts them and the sweep's table says),
    pack 2:4 is 0.5625 of dense fp16 (9 bits/weight), every figure naming its reference."""
    run = CliRunner().invoke
    common = ["--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]
    res = run(cli, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "c"), "--pattern", "2:4", *common])
    assert res.exit_code == 0, res.output
    assert "16.00 bits/weight as dense bfloat16 (dense fp16: 16)" in res.output
    info = llmprune.api.inspect(tmp_path / "c")
    assert {r["format"] for r in info["layers"]} == {"dense bfloat16"}
    assert info["total"]["bytes"] == info["total"]["fp16_bytes"]  # 16 bits/weight: what compress said
    res = run(cli, ["inspect", str(tmp_path / "c")])
    assert res.exit_code == 0 and "vs fp16" in res.output
    total = res.output.splitlines()[-2].split()
    assert float(total[-3]) == 16.0 and float(total[-1]) == 1.0
    res = run(cli, ["pack", str(tmp_path / "c"), "--pattern", "2:4", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "9.00 bits/weight, 0.562 of their dense fp16 size" in res.output
    packed = llmprune.api.inspect(tmp_path / "p")
    assert packed["total"]["bytes"] / packed["total"]["fp16_bytes"] == pytest.approx(0.5625)
    rows = llmprune.sweep(tiny_model_dir, tmp_path / "s", methods="magnitude", sparsities="2:4", evals=str(calib),
                          calib=str(calib), max_windows=2, **SMALL)
    assert [r["bits"] for r in rows] == [16, 16]
    table = (tmp_path / "s" / "results.md").read_text().splitlines()
    assert table[1].split(" | ")[2] == "bits" and all(line.split(" | ")[2] == "16" for line in table[3:])


RSS_SCRIPT = r"""
import json, sys, threading
import psutil
import gguf, torch, transformers  # noqa: F401  (imports are not the run's memory)
import llmprune
from llmprune import api, ggufio, lazy  # noqa: F401
proc = psutil.Process()
rss0 = proc.memory_info().rss
peak, done = [rss0], threading.Event()

def sample():  # ru_maxrss is no use here: Linux keeps the parent's across fork + exec
    while not done.wait(0.02):
        peak[0] = max(peak[0], proc.memory_info().rss)

threading.Thread(target=sample, daemon=True).start()
llmprune.compress(sys.argv[1], sys.argv[2], method="magnitude", sparsity=0.5, device="cpu", progress=False)
done.set()
print(json.dumps({"before": rss0, "peak": max(peak[0], proc.memory_info().rss)}))
"""


@pytest.mark.slow
def test_a_gguf_streams_in_a_fraction_of_its_dequantized_size(tmp_path):
    """16 blocks of 12.6M weights (808 MB dequantized to fp32): the run's growth in peak RSS stays under 0.6 of
    that (about one block at a time, not the whole model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=1024, intermediate_size=2816,
                                  num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8,
                                  max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config)
    numel = sum(p.numel() for p in model.parameters())
    path = write_llama_gguf(model, tmp_path / "big.gguf", qtype="F16")
    del model
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "out")], capture_output=True,
                         text=True, check=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    assert m["peak"] - m["before"] <= 0.6 * 4 * numel, m
    assert json.loads((tmp_path / "out" / "llmprune.json").read_text())["checkpoint"]["dtype"] == "bfloat16"
