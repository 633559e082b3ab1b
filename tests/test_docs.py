"""The docs agree with the code: docs/cli.md is what scripts/cli_docs.py writes from the Click definitions and
lists every option `--help` shows; the README stays a front door; every relative link in the docs resolves."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from llmprune.cli import cli

ROOT = Path(__file__).parents[1]
CLI_MD = ROOT / "docs" / "cli.md"


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_is_generated_from_the_click_definitions():
    assert CLI_MD.read_text() == _cli_docs().render(), "docs/cli.md is stale: run python scripts/cli_docs.py"


def test_cli_docs_check_exits_1_when_stale(tmp_path, monkeypatch):
    docs = _cli_docs()
    monkeypatch.setattr(docs, "DOC", tmp_path / "cli.md")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli_docs.py", "--check"])
    (tmp_path / "cli.md").write_text(docs.render().replace("Output model directory.", "Output directory."))
    assert docs.main() == 1
    (tmp_path / "cli.md").write_text(docs.render())
    assert docs.main() == 0
    code = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_docs.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr


def _section(name: str) -> str:
    text = CLI_MD.read_text()
    start = text.index(f"## `llmprune {name}`")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_cli_md_lists_what_help_shows(name):
    """Every option `llmprune NAME --help` prints (flags and metavar), its usage line and its examples."""
    out = CliRunner().invoke(cli, [name, "--help"], terminal_width=200).output
    section = _section(name)
    usage = out.splitlines()[0].removeprefix("Usage: ").replace("cli ", "llmprune ", 1)
    assert f"\n{usage}\n" in section, usage
    flags = [m[1] for m in re.finditer(r"^  (-{1,2}\S.*?)(?:  |$)", out.split("Options:")[1], re.M)]
    assert flags and all(f"`{flag}`" in section.replace("\\|", "|") for flag in flags), \
        [f for f in flags if f"`{f}`" not in section.replace("\\|", "|")]
    assert len(flags) == section.count("\n| `-"), "docs/cli.md lists an option --help does not"
    for example in re.findall(r"^  (llmprune .+?)(?:\s{3,}|$)", out, re.M):
        assert example in section, example


def test_every_option_has_help_so_the_table_has_no_empty_cell():
    for name, cmd in cli.commands.items():
        options = [p for p in cmd.params if isinstance(p, click.Option)]
        assert all(p.help for p in options), (name, [p.name for p in options if not p.help])


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for command in cli.commands:
        assert f"`{command}`" in readme, f"the README's table of commands misses {command}"


def test_relative_links_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists, and a heading of it when it
    names one (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens)."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target:
                continue
            path = page.parent / target if target else page
            assert path.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
            if anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.relative_to(ROOT)} links to {target}#{anchor}: no such heading"


def test_module_map_names_every_module_in_import_order():
    """docs/architecture.md's module map: every module of the package once, each importing only modules
    listed below it."""
    from test_api import _module_files, import_graph

    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Module map", 1)[1].split("```", 2)[1]
    listed = [m[1] for m in re.finditer(r"^(llmprune/\S+\.py)", block, re.M)]

    def module(path: str) -> str:
        return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")

    order = [module(p) for p in listed]
    assert sorted(order) == sorted(_module_files()), set(order) ^ set(_module_files())
    position = {m: i for i, m in enumerate(order)}
    graph = import_graph()
    up = [(m, d) for m in order for d in graph[m] if position[d] < position[m]]
    assert not up, f"listed above a module that imports it: {up}"
