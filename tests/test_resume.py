"""Models larger than memory: lazy block loading, incremental writing to OUT.partial/, resume after SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmprune.cli import main


def args(d: Path, out: Path, *extra, model: Path | None = None) -> list[str]:
    """A streamed compress of the ``sharded`` fixture's model (or ``model``) into ``out`` (test_faults uses it)."""
    return ["compress", str(model or d / "model"), "--out", str(out), "--calib", str(d / "calib.txt"),
            "--nsamples", "8", "--seqlen", "64", "--device", "cpu", *extra]


def run(argv, capsys=None) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def files(directory: Path) -> dict[str, bytes]:
    """Every weight file, the index and the config, byte for byte (the report holds timings)."""
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())
            if f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json", "config.json")}


def state(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


@pytest.mark.parametrize("extra", [(), ("--wbits", "4", "--group-size", "32"), ("--sparsity", "0.6", "--allocation",
                                                                                  "owl")])
def test_lazy_and_eager_give_the_same_model(sharded, tmp_path, extra):
    assert run(args(sharded, tmp_path / "lazy", *extra)) == 0
    assert run(args(sharded, tmp_path / "eager", "--no-lazy", *extra)) == 0
    a, b = state(tmp_path / "lazy"), state(tmp_path / "eager")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "lazy" / "llmprune.json").read_text())
    eager = json.loads((tmp_path / "eager" / "llmprune.json").read_text())
    assert report["model"]["lazy"] and len(report["layers"]) == 6 * 7
    assert {k: v for k, v in report["model"].items() if k != "lazy"} == eager["model"]  # source, dtype, type
    assert not (tmp_path / "lazy.partial").exists()
    if "--wbits" in extra:  # the grids are kept, so the checkpoint can be packed later
        assert (tmp_path / "lazy" / "llmprune-grids.safetensors").is_file()


def test_eval_ppl_streams_from_disk_with_the_same_result(sharded, capsys):
    from llmprune.loading import load_model
    from llmprune.perplexity import perplexity

    assert run(["eval-ppl", str(sharded / "model"), "--dataset", str(sharded / "calib.txt"), "--seqlen", "64",
                "--max-windows", "4", "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    from llmprune.data import eval_windows, load_text, tokenize

    model, tok, _ = load_model(str(sharded / "model"))
    text, _ = load_text(str(sharded / "calib.txt"), "all")  # a local file: all of it, by default
    windows = eval_windows(tokenize(tok, text), 64, str(sharded / "calib.txt"), 4)
    assert got == perplexity(model, windows, torch.device("cpu"), 4)


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


def _kill_after(proc: subprocess.Popen, journal: Path, k: int) -> int:
    """SIGKILL ``proc`` as soon as the journal lists k finished blocks; return how many it listed then."""
    done = _wait_for_blocks(proc, journal, k)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return done


def test_sigkill_then_resume_is_byte_identical(sharded, tmp_path):
    ref = tmp_path / "ref"
    assert run(args(sharded, ref)) == 0
    for k in (1, 3, 5):
        out = tmp_path / f"out{k}"
        done = _kill_after(_spawn(args(sharded, out)), tmp_path / f"out{k}.partial" / "journal.json", k)
        assert not out.exists() and (tmp_path / f"out{k}.partial").is_dir()
        proc = subprocess.run([sys.executable, "-m", "llmprune", *args(sharded, out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-800:]
        assert f"{done} blocks already done" in proc.stderr
        assert files(out) == files(ref)
        assert not (tmp_path / f"out{k}.partial").exists()


def test_resume_with_another_spec_is_refused(sharded, tmp_path, capsys):
    out = tmp_path / "o"
    _kill_after(_spawn(args(sharded, out)), tmp_path / "o.partial" / "journal.json", 2)
    before = sorted(p.name for p in (tmp_path / "o.partial").iterdir() if p.name != ".lock")  # the killed run's
    assert run(args(sharded, out, "--sparsity", "0.6")) == 2
    err = capsys.readouterr().err
    assert "different spec (recipe differ)" in err and "o.partial" in err
    assert sorted(p.name for p in (tmp_path / "o.partial").iterdir()) == before and not out.exists()


def test_disk_full_keeps_the_partial_directory_for_resume(sharded, tmp_path, capsys, monkeypatch):
    import llmprune.resume as resume

    real = resume.save_tensors
    calls = {"n": 0}

    def full_after_two(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:
            Path(path).write_bytes(b"\0" * 100)  # the disk fills up part way through the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(resume, "save_tensors", full_after_two)
    out = tmp_path / "o"
    assert run(args(sharded, out)) == 2
    err = capsys.readouterr().err
    assert "disk full while writing" in err and "re-run the same command" in err and "Traceback" not in err
    assert not out.exists()
    journal = json.loads((tmp_path / "o.partial" / "journal.json").read_text())
    assert sorted(journal["blocks"]) == ["0", "1"]
    assert not [p for p in (tmp_path / "o.partial").iterdir() if p.name.startswith(".")]  # no temp files left
    monkeypatch.setattr(resume, "save_tensors", real)
    assert run(args(sharded, out)) == 0
    assert run(args(sharded, tmp_path / "ref")) == 0
    assert files(out) == files(tmp_path / "ref")


def test_a_truncated_shard_is_named(sharded, tmp_path, capsys):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(sharded / "model", src)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code = run(["compress", str(src), "--out", str(tmp_path / "o"), "--calib", str(sharded / "calib.txt"),
                "--nsamples", "4", "--seqlen", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and shard.name in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_lazy_model_holds_one_block_and_nothing_else_between_uses(sharded, prefetch):
    """Host memory is one block (two while the next is prefetched): embeddings and head are read for the
    capture and dropped after it."""
    from transformers import AutoModelForCausalLM

    from llmprune.arch import find_blocks
    from llmprune.engine import Stream
    from llmprune.lazy import load_lazy

    model, _ = load_lazy(sharded / "model")
    _, blocks = find_blocks(model)

    def real(module: torch.nn.Module) -> set[str]:
        return {n for n, p in module.named_parameters() if p.device.type != "meta"}

    assert real(model) == set()
    seen = []

    def on_block(i, block, forward_all):
        forward_all()
        seen.append(i)
        assert real(block) == {n for n, _ in block.named_parameters()}  # this block, whole
        others = [j for j, b in enumerate(blocks) if j != i and real(b)]
        assert others in ([], [i + 1] if prefetch else []) and real(model.get_input_embeddings()) == set()
        assert real(model.get_output_embeddings()) == set()

    ids = torch.randint(0, 320, (2, 16))
    out = Stream(model, [ids], "cpu", prefetch=prefetch).run(on_block)
    assert seen == list(range(6)) and real(model) == set()
    ref = AutoModelForCausalLM.from_pretrained(sharded / "model")  # the streamed result is the eager model's
    with torch.no_grad():
        hidden = ref(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]  # normed
    torch.testing.assert_close(ref.model.norm(out[0]), hidden, rtol=1e-5, atol=1e-5)


def test_a_run_that_fails_mid_way_puts_every_block_back(sharded):
    """An error in block 2 (with block 3 being prefetched) leaves no block in memory and no worker behind."""
    import threading

    from llmprune.engine import Stream
    from llmprune.lazy import load_lazy

    model, _ = load_lazy(sharded / "model")

    def on_block(i, block, forward_all):
        if i == 2:
            raise RuntimeError("solver failed")

    with pytest.raises(RuntimeError, match="solver failed"):
        Stream(model, [torch.randint(0, 320, (2, 16))], "cpu", prefetch=True).run(on_block)
    assert [n for n, p in model.named_parameters() if p.device.type != "meta"] == []
    assert not [t for t in threading.enumerate() if t.name.startswith("llmprune-prefetch")]
