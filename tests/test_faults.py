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
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_resume import _spawn, _wait_for_blocks, args, files, run  # the same streamed runs

from llmprune.cli import main


@pytest.fixture(scope="module")
def reference(sharded, tmp_path_factory) -> Path:
    """A lone, uninterrupted run of ``args``."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert run(args(sharded, out)) == 0
    return out


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



def _wait_for_lock(proc: subprocess.Popen, lock: Path) -> None:
    """Poll until ``lock`` names ``proc`` as its holder."""
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads(lock.read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"finished before it held {lock}: {proc.stderr.read()[-500:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("timed out")


def _in_memory(sharded: Path, out: Path, command: str) -> list[str]:
    """A run that keeps no journal: compress or shrink with the model loaded whole (--no-lazy)."""
    if command == "compress":
        return args(sharded, out, "--no-lazy")
    return ["shrink", *args(sharded, out, "--no-lazy", "--mlp", "0.25", "--align", "16")[1:]]


@pytest.mark.parametrize("command", ["compress", "shrink"])
def test_a_second_in_memory_run_on_the_same_output_is_refused_and_the_first_finishes_intact(sharded, tmp_path,
                                                                                            capsys, command):
    """The lock streamed runs take in OUT.partial/, taken by in-memory runs too, before they load the model."""
    out, partial = tmp_path / "o", tmp_path / "o.partial"
    assert run(_in_memory(sharded, tmp_path / "lone", command)) == 0
    capsys.readouterr()
    first = _spawn(_in_memory(sharded, out, command))
    _wait_for_lock(first, partial / ".lock")
    first.send_signal(signal.SIGSTOP)
    try:
        assert run(_in_memory(sharded, out, command)) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "being written by another run" in line
        assert [p.name for p in partial.iterdir()] == [".lock"] and not out.exists()  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-800:]
    assert files(out) == files(tmp_path / "lone")
    assert not partial.exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("command", ["compress --no-lazy", "shrink --no-lazy", "shrink", "pack"])
def test_every_writer_respects_a_live_lock(sharded, tmp_path, capsys, command):
    """Whatever the command and path, a lock naming a live run refuses before anything is read or written."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        partial = tmp_path / "o.partial"
        partial.mkdir()
        (partial / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        name, *flags = command.split()
        if name == "pack":
            argv = ["pack", str(sharded / "model"), "--pattern", "2:4", "--out", str(tmp_path / "o")]
        else:
            argv = [name, *args(sharded, tmp_path / "o", *flags, *(["--mlp", "0.25"] if name == "shrink" else []))[1:]]
        assert run(argv) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"pid {sleeper.pid} on {socket.gethostname()}" in line and str(partial / ".lock") in line
        assert [p.name for p in partial.iterdir()] == [".lock"] and sorted(p.name for p in tmp_path.iterdir()) == [
            "o.partial"]
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("command", ["compress", "shrink"])
def test_an_in_memory_run_takes_over_a_stale_lock_with_a_warning(sharded, tmp_path, capsys, command):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "o.partial").mkdir()
    (tmp_path / "o.partial" / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                             "since": "then"}))
    assert run(_in_memory(sharded, tmp_path / "o", command)) == 0
    assert f"taking over the lock of a run that is gone (pid {dead.pid} on" in capsys.readouterr().err
    assert (tmp_path / "o" / "config.json").is_file() and not (tmp_path / "o.partial").exists()


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


# -- signals ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_with_one_line_and_the_rerun_resumes_byte_identical(sharded, reference, tmp_path,
                                                                                    sig, code):
    out, partial = tmp_path / "o", tmp_path / "o.partial"
    proc = _spawn(args(sharded, out))
    _wait_for_blocks(proc, partial / "journal.json", 1)
    # frozen first: the tiny run finishes its last blocks in well under a second, so the signal must not race it
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == code, err[-2000:]
    assert "Traceback" not in err
    journal = json.loads((partial / "journal.json").read_text())
    done = len(journal["blocks"])
    assert err.rstrip().endswith(f"llmprune: interrupted after block {done} of 6; re-run the same command to"
                                 " resume"), err[-500:]
    assert sorted(journal["blocks"]) == [str(i) for i in range(done)]  # the journal: finished blocks, in order
    assert all((partial / b["file"]).is_file() for b in journal["blocks"].values())
    assert not [p.name for p in partial.iterdir() if p.name.startswith(".")]  # no temp files, the lock released
    again = subprocess.run([sys.executable, "-m", "llmprune", *args(sharded, out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-800:]
    assert f"{done} blocks already done" in again.stderr and "taking over" not in again.stderr
    assert files(out) == files(reference)


def test_a_signal_inside_a_journal_write_waits_for_it(tmp_path):
    """The block being journaled when the signal comes is finished first, then the run stops."""
    from llmprune import signals
    from llmprune.resume import PartialOutput

    partial = PartialOutput(tmp_path / "o", {"a": 1})
    before = signal.getsignal(signal.SIGTERM)
    with signals.installed():
        real = partial._write_journal

        def write_after_a_signal() -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives between the block's file and its journal entry
            real()

        partial._write_journal = write_after_a_signal
        with pytest.raises(signals.Interrupted) as exc:
            partial.finish_block(0, {"w": torch.ones(2)}, [], {})
    assert exc.value.exit_code == 143
    assert list(json.loads((partial.dir / "journal.json").read_text())["blocks"]) == ["0"]
    partial.close()
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are the CLI run's only


# -- reproducibility --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [(), ("--no-lazy", "--two-pass", "--pattern", "2:4", "--wbits", "4", "--group-size",
                                        "32", "--format", "compressed-tensors")])
def test_the_same_command_twice_writes_the_same_bytes(sharded, tmp_path, extra):
    """Same machine, same command: the same output bytes, from two processes (each its own hash seed)."""
    outs = []
    for i, seed in enumerate(("1", "2")):
        out = tmp_path / f"o{i}"
        done = subprocess.run([sys.executable, "-m", "llmprune", *args(sharded, out, *extra)], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONHASHSEED=seed, TOKENIZERS_PARALLELISM="false"))
        assert done.returncode == 0, done.stderr[-800:]
        outs.append(files(out))
    assert outs[0].keys() == outs[1].keys() and any(k.endswith(".safetensors") for k in outs[0])
    assert [k for k in outs[0] if outs[0][k] != outs[1][k]] == []


# -- hostile input, fuzzed --------------------------------------------------------------------------------------

NO_MODEL = "/nonexistent-llmprune/model"  # every run fails at the model at the latest: no heavy work
FUZZED = ("compress", "shrink", "sweep", "eval-ppl", "pack", "unpack", "inspect", "bench-speed")
NOT_FUZZED = {"--log-file", "--out", "--config"}  # files the run would write; --config: the YAML test below


def _value(param) -> st.SearchStrategy[str]:
    import click

    junk = st.one_of(st.integers(-(10**12), 10**12).map(str), st.floats().map(repr),
                     st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=8),
                     st.sampled_from(["", "0", "-1", "1e400", "nan", "inf", "2:4", "0:0", "4:2", "auto", "cuda:7",
                                      "[", "(?", "none", "none,4", "a,,b"]))
    if isinstance(param.type, click.Choice):
        return st.one_of(st.sampled_from(list(param.type.choices)), junk)
    if isinstance(param.type, click.types.IntParamType):  # mostly well-typed: the recipe's checks are the target
        return st.one_of(st.integers(-2, 16).map(str), st.integers(-(10**12), 10**12).map(str), junk)
    if isinstance(param.type, click.types.FloatParamType):
        return st.one_of(st.floats(-2, 2).map(repr), st.floats().map(repr), junk)
    return junk


@st.composite
def _argv(draw) -> list[str]:
    from llmprune.cli import cli

    name = draw(st.sampled_from(FUZZED))
    command = cli.commands[name]
    options = [p for p in command.params if p.param_type_name == "option" and p.opts[0] not in NOT_FUZZED]
    argv = [name, NO_MODEL]
    if any(p.opts[0] == "--out" for p in command.params):
        argv += ["--out", "/nonexistent-llmprune/out"]
    for p in draw(st.lists(st.sampled_from(options), max_size=6, unique_by=lambda p: p.opts[0])):
        argv += [draw(st.sampled_from(p.opts))] if p.is_flag else [p.opts[0], draw(_value(p))]
    return argv


def _run_quietly(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, err.getvalue()


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(_argv())
def test_fuzzed_options_give_one_line_or_success(argv):
    code, err = _run_quietly(argv)
    assert code == 2, (argv, err)  # the model does not exist: never a success, never a crash
    one_line_error(err)


_RECIPE_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(), st.text(max_size=6),
              st.sampled_from(["sparsegpt", "wanda", "2:4", "auto", "fp64", "owl", "spdy", "dense"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=2)),
    max_leaves=4)


@st.composite
def _recipe_yaml(draw) -> str:
    import dataclasses

    from llmprune.recipe import Recipe

    keys = [f.name for f in dataclasses.fields(Recipe)]
    recipe = draw(st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=6)), _RECIPE_VALUES,
                                  max_size=5))
    form = draw(st.sampled_from(["mapping", "top-level value", "broken"]))
    if form == "top-level value":
        return yaml.safe_dump(draw(_RECIPE_VALUES))
    text = yaml.safe_dump(recipe)
    return text if form == "mapping" else text[: draw(st.integers(0, len(text)))] + draw(st.sampled_from(
        [":", "- [", "{", "\t", "&a *b", "!!python/object:os.system", "\x00"]))


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(_recipe_yaml(), st.sampled_from(["compress", "shrink", "sweep"]))
def test_fuzzed_yaml_recipes_give_one_line(tmp_path_factory, text, command):
    path = tmp_path_factory.mktemp("yaml") / "recipe.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    code, err = _run_quietly([command, NO_MODEL, "--out", "/nonexistent-llmprune/out", "--config", str(path)])
    assert code == 2, (text, err)
    one_line_error(err)


@pytest.mark.parametrize(("change", "said"), [
    ({"num_hidden_layers": 10**9}, "describes at least 3.48e+13 parameters"),
    ({"hidden_size": 0}, "gives hidden_size 0, not a positive size"),
    ({"vocab_size": 10**12}, "describes at least 6.4e+13 parameters"),
    ({"num_attention_heads": -4}, "gives num_attention_heads -4, not a positive size"),
])
def test_a_config_with_absurd_sizes_is_refused_before_any_work(sharded, tmp_path, capsys, change, said):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sharded / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | change))
    t0 = time.perf_counter()
    assert run(args(sharded, tmp_path / "o", model=model)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert said in line and "the config is damaged" in line and time.perf_counter() - t0 < 30
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# -- damaged checkpoints and tokenizers -------------------------------------------------------------------------

def _header(shard: Path) -> tuple[dict, bytes]:
    import struct

    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(shard: Path, header: dict, body: bytes) -> None:
    import struct

    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _damage(model: Path, how: str) -> None:
    """Break ``model``'s checkpoint (a copy of the ``sharded`` fixture's) the way ``how`` says."""
    index = model / "model.safetensors.index.json"
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = model / json.loads(index.read_text())["weight_map"][key]
    header, body = _header(shard)
    if how == "offsets past the end":
        header[key]["data_offsets"][1] += 10**6
    elif how == "overlapping offsets":
        other = next(k for k in header if k not in (key, "__metadata__"))
        header[other]["data_offsets"] = header[key]["data_offsets"]
    elif how == "a dtype of another size":
        header[key]["dtype"] = "F64"
    elif how == "an integer dtype of the same size":
        header[key]["dtype"] = {"F32": "I32", "F16": "I16", "BF16": "I16"}[header[key]["dtype"]]
    elif how == "a missing shard":
        shard.unlink()
        return
    elif how == "a broken index":
        index.write_text('{"weight_map": ')
        return
    _write_header(shard, header, body)


DAMAGED = {  # how -> what the one line says
    "offsets past the end": "(SafetensorError: invalid shape, data type, or offset for tensor): the file is truncated,"
                            " damaged or not safetensors; re-create it",
    "overlapping offsets": "(SafetensorError: invalid offset for tensor",
    "a dtype of another size": "(SafetensorError: invalid shape, data type, or offset for tensor)",
    "an integer dtype of the same size": "model.layers.0.self_attn.q_proj.weight is stored as I32 in",
    "a missing shard": "model.safetensors.index.json names model-0000",
    "a broken index": "model.safetensors.index.json is not a safetensors index (no weight_map",
}


@pytest.mark.parametrize("extra", [(), ("--no-lazy",)])
@pytest.mark.parametrize("how", list(DAMAGED))
def test_a_damaged_checkpoint_is_named_in_one_line_before_any_work(sharded, tmp_path, capsys, how, extra):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sharded / "model", model)
    _damage(model, how)
    assert run(args(sharded, tmp_path / "o", *extra, model=model)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert DAMAGED[how] in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


_HEADER_EDITS = st.sampled_from(["data_offsets", "dtype", "shape", "drop", "rename"])


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 3), _HEADER_EDITS, st.integers(-(2**40), 2**40),
                          st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3"])),
                min_size=1, max_size=3))
def test_fuzzed_safetensors_headers_are_read_or_refused_in_one_line(tmp_path_factory, edits):
    """Any lie in a shard's header: the reader refuses it (UsageError) or reads exactly what the header says."""
    from safetensors.torch import save_file

    from llmprune.checkpoint import TensorReader
    from llmprune.errors import UsageError

    d = tmp_path_factory.mktemp("st")
    g = torch.Generator().manual_seed(0)
    save_file({f"t{i}.weight": torch.randn(3, 2 + i, generator=g) for i in range(4)}, d / "model.safetensors")
    header, body = _header(d / "model.safetensors")
    for i, field, number, dtype in edits:
        entry = header.get(f"t{i}.weight")
        if entry is None:  # dropped or renamed by an earlier edit
            continue
        if field == "data_offsets":
            entry["data_offsets"][number % 2] = abs(number) % (2 * len(body) + 1) if number % 3 else number
        elif field == "dtype":
            entry["dtype"] = dtype
        elif field == "shape":
            entry["shape"] = [abs(number) % 9, number % 5] if number % 7 else [number]
        elif field == "drop":
            header.pop(f"t{i}.weight", None)
        else:
            header[f"t{i}.bias"] = header.pop(f"t{i}.weight")
    _write_header(d / "model.safetensors", header, body)
    try:
        reader = TensorReader(d)
        reader.check(float_weights=True)
        got = {k: reader.get(k) for k in reader.keys()}
    except UsageError as exc:
        assert "\n" not in str(exc) and str(d / "model.safetensors") in str(exc)
        return
    assert {k: (list(t.shape), t.is_floating_point()) for k, t in got.items()} == {
        k: (v["shape"], True) for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def bare_tokenizer_model(sharded, tiny_tokenizer, tmp_path_factory) -> Path:
    """The ``sharded`` model with a tokenizer that has no BOS, EOS or pad token."""
    import shutil

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("bare") / "model"
    shutil.copytree(sharded / "model", d, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer).save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, None, None)
    return d


def _evaluates(sharded: Path, model: Path, *extra: str) -> list[str]:
    return ["eval-ppl", str(model), "--dataset", str(sharded / "calib.txt"), "--seqlen", "64", "--max-windows", "2",
            "--device", "cpu", *extra]


@pytest.mark.parametrize("command", ["compress", "compress --no-lazy", "eval-ppl"])
def test_a_tokenizer_without_bos_eos_or_pad_works_and_bos_is_refused_before_the_model_loads(
        bare_tokenizer_model, sharded, tmp_path, capsys, monkeypatch, command):
    """Windows are fixed-length (no pad) and need BOS only when asked for (--bos): then one line, nothing read."""
    from llmprune import api

    name, *flags = command.split()

    def argv(*extra: str) -> list[str]:
        if name == "eval-ppl":
            return _evaluates(sharded, bare_tokenizer_model, *extra)
        return args(sharded, tmp_path / "o", *flags, *extra, model=bare_tokenizer_model)

    assert run(argv()) == 0
    capsys.readouterr()
    if name == "compress":
        import shutil

        shutil.rmtree(tmp_path / "o")

    def no_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    from llmprune import pipeline

    for module in (api, pipeline):  # compress loads in the pipeline, shrink in the API
        monkeypatch.setattr(module, "load_whole", no_load)
        monkeypatch.setattr(module, "open_lazy", no_load)
    assert run(argv("--bos")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == "llmprune: error: --bos: this tokenizer adds no BOS token by default; drop --bos"
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_fp8_weights_are_checked_for_nan_like_any_other():
    """A model whose linears a loader kept in FP8 (compressed-tensors scales, weights) is checked, not refused
    for a dtype isfinite lacks; a NaN among them is still named."""
    from llmprune.engine import check_finite_weights
    from llmprune.errors import NonFiniteError

    m = torch.nn.Linear(4, 4)
    m.weight_scale = torch.nn.Parameter(torch.ones(4, 1).to(torch.float8_e4m3fn), requires_grad=False)
    check_finite_weights(m, "block")
    m.weight_scale.data[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="block.weight_scale holds 1 non-finite"):
        check_finite_weights(m, "block")
