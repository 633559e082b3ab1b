"""Faults a long run meets: a second writer on the same output, non-finite values, signals, hostile input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmprune.cli import main
from llmprune.data import builtin_text_path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny 6-block llama saved as several shards, its tokenizer, and a calibration file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(d / "model", max_shard_size="200KB")
    tiny_tokenizer.save_pretrained(d / "model")
    (d / "calib.txt").write_text(builtin_text_path().read_text()[:60_000])
    return d


@pytest.fixture(scope="module")
def reference(sharded, tmp_path_factory) -> Path:
    """A lone, uninterrupted run of ``args``."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert run(args(sharded, out)) == 0
    return out


def args(d: Path, out: Path, *extra, model: Path | None = None) -> list[str]:
    return ["compress", str(model or d / "model"), "--out", str(out), "--calib", str(d / "calib.txt"),
            "--nsamples", "8", "--seqlen", "64", "--device", "cpu", *extra]


def run(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def files(directory: Path) -> dict[str, bytes]:
    """Every weight file, the index and the config, byte for byte (the report holds timings)."""
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())
            if f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json", "config.json")}


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "llmprune", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_blocks(proc: subprocess.Popen, journal: Path, k: int) -> int:
    """Poll until the journal lists k finished blocks; return how many it listed then."""
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            done = len(json.loads(journal.read_text())["blocks"])
        except (OSError, ValueError):
            done = 0
        if done >= k:
            return done
        if proc.poll() is not None:
            pytest.fail(f"finished before block {k}: {proc.stderr.read()[-500:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("timed out")


def one_line_error(err: str) -> str:
    """The one error line that ends stderr (after the log and progress lines), with no traceback."""
    assert "Traceback" not in err and err.count("llmprune: error: ") == 1, err
    line = err[err.index("llmprune: error: "):].strip()
    assert "\n" not in line, err
    return line


# -- one writer per output -------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_output_is_refused_and_the_first_finishes_intact(sharded, reference, tmp_path,
                                                                                   capsys):
    out = tmp_path / "o"
    first = _spawn(args(sharded, out))
    partial = tmp_path / "o.partial"
    _wait_for_blocks(first, partial / "journal.json", 1)
    first.send_signal(signal.SIGSTOP)  # frozen mid-run: alive, holding its lock
    try:
        before = {p.name: p.read_bytes() for p in partial.iterdir()}
        assert run(args(sharded, out)) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "being written by another run" in line
        assert {p.name: p.read_bytes() for p in partial.iterdir()} == before  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-800:]
    assert files(out) == files(reference)
    assert not partial.exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("holder", ["live pid", "other host"])
def test_a_lock_naming_a_live_run_or_another_host_is_respected(sharded, tmp_path, capsys, holder):
    """A lock without its flock (a file system without flock, another host's run) decides by its pid and host."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        partial = tmp_path / "o.partial"
        partial.mkdir()
        host = socket.gethostname() if holder == "live pid" else "elsewhere.example"
        pid = sleeper.pid if holder == "live pid" else 1 << 22
        (partial / ".lock").write_text(json.dumps({"pid": pid, "host": host, "since": "then"}))
        assert run(args(sharded, tmp_path / "o")) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"pid {pid} on {host}" in line and str(partial / ".lock") in line
        assert sorted(p.name for p in partial.iterdir()) == [".lock"] and not (tmp_path / "o").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_stale_lock_of_a_killed_run_is_taken_over_and_the_run_resumes(sharded, reference, tmp_path):
    out = tmp_path / "o"
    first = _spawn(args(sharded, out))
    done = _wait_for_blocks(first, tmp_path / "o.partial" / "journal.json", 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    lock = json.loads((tmp_path / "o.partial" / ".lock").read_text())
    assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()  # left behind, naming a dead pid
    proc = subprocess.run([sys.executable, "-m", "llmprune", *args(sharded, out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert f"taking over the lock of a run that is gone (pid {first.pid}" in proc.stderr
    assert f"{done} blocks already done" in proc.stderr
    assert files(out) == files(reference) and not (out / ".lock").exists()



# -- non-finite values, named where they start ----------------------------------------------------------------

def _with_nan_in_q_proj(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose layer 0 q_proj holds one NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = dst / json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("extra", [(), ("--no-lazy",), ("--two-pass",), ("--method", "magnitude")])
def test_a_nan_weight_is_named_and_nothing_is_written(sharded, tmp_path, capsys, extra):
    _with_nan_in_q_proj(sharded / "model", tmp_path / "model")
    assert run(args(sharded, tmp_path / "o", *extra, model=tmp_path / "model")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "model.layers.0.self_attn.q_proj.weight holds 1 non-finite value (NaN or inf) of 4096" in line
    assert "Hessian" not in line and "o_proj" not in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny float16 llama whose layer 0 MLP output passes float16's 65504 on any text (its weights do not)."""
    from conftest import tiny_model

    d = tmp_path_factory.mktemp("fp16") / "model"
    model = tiny_model("llama").half()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(50)
        model.model.layers[0].mlp.down_proj.weight.fill_(30000)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("extra", [("--sequential",), ("--two-pass",), ("--no-lazy",)])
def test_float16_activations_that_overflow_are_named_with_the_dtype_to_use(overflowing, sharded, tmp_path, capsys,
                                                                          extra):
    argv = args(sharded, tmp_path / "o", "--method", "wanda", *extra, model=overflowing)
    assert run(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "the output of model.layers.0 holds non-finite activations" in line and "in float16" in line
    assert "float16 overflow is the likely cause" in line and "--dtype bfloat16 or --dtype float32" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert run([*argv, "--dtype", "float32"]) == 0  # the advice works
    capsys.readouterr()
    from safetensors.torch import load_file

    assert all(bool(torch.isfinite(t).all()) for t in load_file(tmp_path / "o" / "model.safetensors").values())


def test_a_solve_that_leaves_float16_is_named(overflowing, sharded, tmp_path, capsys):
    """SparseGPT's updates to weights already near float16's limit overflow it: named, never written as inf."""
    assert run(args(sharded, tmp_path / "o", model=overflowing)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("llmprune: error: model.layers.0.mlp.down_proj: its sparsegpt solve gave")
    assert "float16 overflow is the likely cause" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_hessian_with_non_finite_entries_is_named_before_cholesky():
    from llmprune.errors import NonFiniteError
    from llmprune.solvers.hinv import inverse_hessian_cholesky

    X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    H = X.T @ X
    H[2, 3] = float("inf")
    with pytest.raises(NonFiniteError, match="its Hessian holds 1 non-finite entries"):
        inverse_hessian_cholesky(H, 0.01)
