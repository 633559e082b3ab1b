"""The Python API: the same results and the same errors as the CLI, in place or to a directory; the README's
example runs; the package's import graph has no cycles and its arrows point down."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import requires_smollm2

import llmprune
from llmprune.cli import main
from llmprune.data import builtin_text_path

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(nsamples=4, seqlen=32, device="cpu")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


def cli(*args) -> tuple[int, str]:
    """Exit code and stderr of one CLI invocation."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, err.getvalue()


def weights(directory: Path) -> dict[str, torch.Tensor]:
    model, _ = llmprune.load(directory)
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_run(a: dict, b: dict) -> None:
    """Two reports describe the same computation (timings, paths and how the model was loaded aside)."""
    for key in ("recipe", "global_sparsity", "target_sparsity", "pruned_params", "allocation", "device"):
        assert a[key] == b[key], key
    assert a["calibration"]["sha256"] == b["calibration"]["sha256"]
    timing = ("seconds", "error_seconds")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in a["layers"]]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in b["layers"]]


def test_api_equals_cli_to_a_directory_and_in_place(tiny_model_dir, tiny_tokenizer, calib, tmp_path):
    code, err = cli("compress", tiny_model_dir, "--out", tmp_path / "cli", "--calib", calib, "--nsamples", 4,
                    "--seqlen", 32, "--device", "cpu", "--pattern", "2:4")
    assert code == 0, err
    want = weights(tmp_path / "cli")
    want_report = json.loads((tmp_path / "cli" / "llmprune.json").read_text())

    # a model directory to a directory (streamed from disk, as the CLI does)
    report = llmprune.compress(tiny_model_dir, tmp_path / "api", calib=str(calib), pattern="2:4", **SMALL)
    assert isinstance(report, llmprune.Report)
    got = weights(tmp_path / "api")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert report.to_dict() == json.loads((tmp_path / "api" / "llmprune.json").read_text())
    same_run(report.to_dict(), want_report)

    # an in-memory model, compressed in place, no directory written (in the dtype a directory's fp32 weights are
    # compressed and written in: bfloat16)
    model, tok = llmprune.load(tiny_model_dir, dtype="bfloat16")
    report = llmprune.compress(model, tokenizer=tok, calib=str(calib), pattern="2:4", **SMALL)
    assert report.module is model and report.checkpoint is None
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    same_run(report.to_dict(), want_report)
    assert report.model["kind"] == "memory"

    # an in-memory model to a directory; a Recipe object with an option on top
    model, tok = llmprune.load(tiny_model_dir, dtype="bfloat16")
    recipe = llmprune.Recipe(calib=str(calib), pattern="2:4", nsamples=4, seqlen=32)
    report = llmprune.compress(model, tmp_path / "mem", recipe, tokenizer=tok, device="cpu")
    got = weights(tmp_path / "mem")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert llmprune.Report.read(tmp_path / "mem") == report


def test_evaluate_equals_eval_ppl(tiny_model_dir, calib, capsys):
    code = None
    with pytest.raises(SystemExit) as exc:
        main(["eval-ppl", str(tiny_model_dir), "--dataset", str(calib), "--seqlen", "32", "--max-windows", "4",
              "--device", "cpu", "--json"])
    code = exc.value.code
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    want = json.loads(line)
    got = llmprune.evaluate(tiny_model_dir, str(calib), seqlen=32, max_windows=4, device="cpu", progress=False)
    assert got["ppl"] == want["ppl"] and got["windows"] == want["windows"] == 4
    model, tok = llmprune.load(tiny_model_dir)
    in_memory = llmprune.evaluate(model, str(calib), tokenizer=tok, seqlen=32, max_windows=4, device="cpu")
    assert in_memory["ppl"] == pytest.approx(want["ppl"], rel=1e-6)


@pytest.mark.parametrize(
    "options,flags",
    [
        (dict(sparsity=1.5), ["--sparsity", "1.5"]),
        (dict(pattern="3:2"), ["--pattern", "3:2"]),
        (dict(wbits=9), ["--wbits", "9"]),
        (dict(pattern="2:4", act_order=True, wbits=4), ["--pattern", "2:4", "--act-order", "--wbits", "4"]),
        (dict(calib="/no/such/file.txt"), ["--calib", "/no/such/file.txt"]),
    ],
)
def test_bad_options_raise_the_cli_message(tiny_model_dir, tmp_path, options, flags):
    code, err = cli("compress", tiny_model_dir, "--out", tmp_path / "o", *flags)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: ")
    with pytest.raises(llmprune.UsageError) as exc:
        llmprune.compress(tiny_model_dir, tmp_path / "o2", **options)
    assert str(exc.value) == lines[0].removeprefix("llmprune: error: ")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("options,named", [(dict(sparsty=0.5), "sparsty"), (dict(nsamples="many"), "nsamples"),
                                           (dict(sym="yes"), "sym"), (dict(skip=3), "skip")])
def test_unknown_or_ill_typed_options_name_the_option(tiny_model_dir, tmp_path, options, named):
    with pytest.raises(llmprune.UsageError, match=re.escape(named)):
        llmprune.compress(tiny_model_dir, tmp_path / "o", **options)
    assert not (tmp_path / "o").exists()


def test_in_memory_model_without_a_tokenizer_is_refused(tiny_model_dir, calib):
    from conftest import tiny_model

    with pytest.raises(llmprune.UsageError, match="tokenizer="):
        llmprune.compress(tiny_model("llama"), calib=str(calib), **SMALL)


def test_progress_callback_and_log_file(tiny_model_dir, calib, tmp_path):
    seen: list[tuple[str, int, int]] = []
    llmprune.compress(tiny_model_dir, tmp_path / "a", calib=str(calib), progress=lambda *a: seen.append(a),
                      **SMALL)
    assert [s[1:] for s in seen] == [(1, 2), (2, 2)]  # the tiny llama's two blocks
    log = tmp_path / "run.log"
    code, err = cli("compress", tiny_model_dir, "--out", tmp_path / "b", "--calib", calib, "--nsamples", 4,
                    "--seqlen", 32, "--device", "cpu", "--log-file", log)
    assert code == 0, err
    text = log.read_text()
    assert "INFO llmprune" in text and "wrote" in text and "calibrated on 4 x 32 tokens" in text


def _readme_python() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@requires_smollm2
def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's example, extracted from the README itself, on the built-in model, as a user's machine would
    run it (bf16 only where this CPU computes it natively: an emulated bf16 run of it takes most of an hour)."""
    monkeypatch.delenv("LLMPRUNE_CPU_BF16", raising=False)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_python(), "README.md", "exec"), scope)
    report, ppl = scope["report"], scope["ppl"]
    assert abs(report.global_sparsity - 0.5) < 1e-3
    assert 1 < ppl["ppl"] < 1e4
    assert scope["model"] is not None and (tmp_path / "smollm2-50" / "llmprune.json").is_file()


@requires_smollm2
def test_builtin_model_api_equals_cli(smollm2, tmp_path):
    """The built-in model through the CLI to a directory and through the API in place: one result. (The
    README example compresses it through the API to a directory.) Blocks 3.. are skipped to save time."""
    model, tok, _ = smollm2
    skip = r"layers\.([3-9]|[12][0-9])\."
    flags = ["--method", "sparsegpt", "--calib", "shakespeare", "--nsamples", 2, "--seqlen", 32, "--device", "cpu",
             "--skip", skip]
    code, err = cli("compress", "smollm2-135m", "--out", tmp_path / "cli", *flags)
    assert code == 0, err
    want = json.loads((tmp_path / "cli" / "llmprune.json").read_text())
    assert len(want["layers"]) == 3 * 7
    opts = dict(method="sparsegpt", calib="shakespeare", nsamples=2, seqlen=32, device="cpu", skip=[skip],
                progress=False)
    want_w = weights(tmp_path / "cli")
    assert want["model"]["dtype"] == want["checkpoint"]["dtype"] == "bfloat16"  # the GGUF is written 16-bit
    assert want["checkpoint"]["bits_per_weight"] == 16
    model = copy.deepcopy(model)  # in memory, in the dtype the CLI compressed it in (rotary tables stay fp32)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    report = llmprune.compress(model, tokenizer=tok, **opts)
    same_run(report.to_dict(), want)
    state = model.state_dict()
    assert all(torch.equal(want_w[k], state[k]) for k in want_w)


# --- layering ---------------------------------------------------------------------------------------------

def _module_files() -> dict[str, Path]:
    files = {}
    for path in (ROOT / "llmprune").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its body (functions included)."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert "llmprune.api" in graph and "llmprune.solvers.sparsegpt" in graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_point_down():
    graph = import_graph()
    app = {"llmprune.api", "llmprune.cli", "llmprune.compression", "llmprune.engine", "llmprune.recipe"}
    for name, edges in graph.items():
        if name.startswith("llmprune.kernels"):
            up = {e for e in edges if not e.startswith("llmprune.kernels")}  # kernels import only kernels
            assert not up, f"{name} reaches up into {up}"
        if name.startswith("llmprune.solvers"):
            assert not edges & app, f"{name} imports the application layer: {edges & app}"
        if name not in ("llmprune", "llmprune.cli", "llmprune.__main__", "llmprune.speed"):  # speed: a tool on it
            assert not edges & {"llmprune.api", "llmprune.cli"}, f"{name} imports the API or the CLI"
    assert graph["llmprune.cli"] & {"llmprune.api"}


def test_package_exports_the_api_without_importing_it_eagerly():
    import subprocess
    import sys

    code = "import sys, llmprune; assert 'llmprune.api' not in sys.modules; print(llmprune.compress.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "llmprune.api"
    for name in ("compress", "shrink", "evaluate", "sweep", "bench_speed", "load", "Recipe", "Report", "UsageError"):
        assert callable(getattr(llmprune, name)), name


def test_report_and_bench_speed_live_in_their_own_modules_under_their_old_names():
    from llmprune import api, report, speed

    assert llmprune.Report is api.Report is report.Report  # api re-exports it: `from llmprune.api import Report`
    assert llmprune.bench_speed is speed.bench_speed and not hasattr(api, "bench_speed")
    assert "bench_speed" in llmprune.__all__ and "Report" in api.__all__
