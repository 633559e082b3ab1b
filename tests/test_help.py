"""The first hour: help that answers fast, names every command, lists common options first and shows examples;
the demo writes where it says (not into the current directory) and never replaces a checkpoint unasked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from llmprune.cli import cli, demo_out, main

ROOT = Path(__file__).parent.parent
HEAVY = ("torch", "transformers", "triton", "llmprune.solvers", "llmprune.kernels")


def test_help_of_every_command_imports_no_heavy_module():
    """`llmprune --help` and every `llmprune COMMAND --help` answer without torch, transformers or triton."""
    code = ("import sys\nfrom llmprune.cli import cli, main\n"
            "for argv in [['--help']] + [[name, '--help'] for name in cli.commands]:\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0, argv\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"
    top = subprocess.run([sys.executable, "-m", "llmprune", "--help"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert all(name in top for name in cli.commands)


def test_recipe_admm_defaults_are_the_solvers():
    """The recipe reads admm's defaults from the solver's source (so it need not import it): the same values."""
    import importlib

    from llmprune.recipe import Recipe

    admm = importlib.import_module("llmprune.solvers.admm")  # the module (the package exports the function)

    assert (Recipe.admm_iters, Recipe.admm_rho0, Recipe.admm_rho_growth, Recipe.admm_refit_iters) == \
        (admm.ITERS, admm.RHO0, admm.RHO_GROWTH, admm.REFIT_ITERS)


def test_group_help_says_what_each_command_does():
    out = CliRunner().invoke(cli, ["--help"], terminal_width=100).output
    commands = out.split("Commands:")[1]
    for name, cmd in cli.commands.items():
        assert cmd.short_help and f"{name} {cmd.short_help}" in " ".join(commands.split()), name  # whole
    assert "SparseGPT" in out and "quantization" in out and "llmprune demo" in out


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_command_help_has_examples_and_described_options(name):
    out = CliRunner().invoke(cli, [name, "--help"], terminal_width=120).output
    examples = out.split("Example")[-1]
    assert "Example" in out and f"llmprune {name}" in examples, out
    options = [p for p in cli.commands[name].params if isinstance(p, click.Option)]
    assert all(p.help for p in options), [p.name for p in options if not p.help]


def test_compress_help_lists_common_options_first():
    out = CliRunner().invoke(cli, ["compress", "--help"], terminal_width=120).output
    lines = [ln.split()[0] for ln in out.splitlines() if ln.startswith("  --")]
    first = lines[:12]
    for common in ("--out", "--method", "--sparsity", "--pattern", "--wbits", "--calib", "--nsamples"):
        assert common in first, (common, first)
    for rare in ("--lazy", "--reuse-errors", "--kernels", "--dist-read"):
        assert lines.index(rare) > lines.index("--seed"), rare
    assert lines[-1] == "--help"


def test_demo_writes_to_the_user_cache_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert demo_out(None) == tmp_path / "cache" / "llmprune" / "smollm2-135m-sparsegpt50"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo_out(None) == Path.home() / ".cache" / "llmprune" / "smollm2-135m-sparsegpt50"
    assert demo_out("~/x") == Path.home() / "x"
    out = CliRunner().invoke(cli, ["demo", "--help"]).output
    assert ".cache/llmprune" in out and "--overwrite" in out


def test_demo_refuses_an_earlier_checkpoint_without_overwrite(tmp_path, monkeypatch, capsys):
    """An existing checkpoint is refused before the model loads; --overwrite goes on to load it."""
    from llmprune import api

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    earlier = demo_out(None)
    earlier.mkdir(parents=True)
    (earlier / "llmprune.json").write_text("{}")
    loads = []

    def load(name, **kwargs):
        loads.append(name)
        raise api.UsageError("stop here: the model would load now")

    monkeypatch.setattr(api, "load", load)
    with pytest.raises(SystemExit) as exc:
        main(["demo"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(earlier) in err and "--overwrite" in err and not loads
    assert (earlier / "llmprune.json").read_text() == "{}"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--overwrite"])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "stop here" in captured.err and loads == ["smollm2-135m"]
    assert str(earlier) in captured.out  # it says where the checkpoint goes
