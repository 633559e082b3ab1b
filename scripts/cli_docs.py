"""docs/cli.md from the Click definitions: every command's usage, help, options table and examples, as
`llmprune COMMAND --help` shows them.

    python scripts/cli_docs.py            # writes docs/cli.md
    python scripts/cli_docs.py --check    # exits 1 if docs/cli.md differs from what it would write
    python scripts/cli_docs.py --stdout   # prints it
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.cli import cli  # noqa: E402

DOC = ROOT / "docs" / "cli.md"


def _cell(text: str) -> str:
    """One Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _paragraphs(text: str) -> str:
    """Help text as Click prints it: ``\\b`` blocks kept verbatim (as code), other paragraphs joined."""
    out = []
    for block in inspect.cleandoc(text).split("\n\n"):
        if block.startswith("\b\n"):
            out.append("```\n" + block[2:].rstrip() + "\n```")
        else:
            out.append(" ".join(block.split()))
    return "\n\n".join(out)


def command_doc(name: str, cmd: click.Command, parent: click.Context) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent)
    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    lines = [f"## `llmprune {name}`", "", f"```\n{usage}\n```", ""]
    if cmd.help:
        lines += [_paragraphs(cmd.help), ""]
    rows = [param.get_help_record(ctx) for param in cmd.get_params(ctx) if isinstance(param, click.Option)]
    lines += ["| option | meaning |", "| --- | --- |"]
    lines += [f"| `{_cell(opts)}` | {_cell(help_text)} |" for opts, help_text in filter(None, rows)]
    lines.append("")
    if cmd.epilog:
        lines += [_paragraphs(cmd.epilog), ""]
    return "\n".join(lines)


def render() -> str:
    root = click.Context(cli, info_name="llmprune")
    names = cli.list_commands(root)
    parts = [
        "# Command reference",
        "",
        "Generated from the Click definitions by `python scripts/cli_docs.py` (do not edit by hand;"
        " `tests/test_docs.py` fails when this page and `--help` differ). Each command's options are listed in"
        " the order its `--help` lists them: the common ones first.",
        "",
        f"```\n{' '.join([root.command_path, *cli.collect_usage_pieces(root)])}\n```",
        "",
        _paragraphs(cli.help or ""),
        "",
        "| command | what it does |",
        "| --- | --- |",
        *(f"| [`{n}`](#llmprune-{n}) | {_cell(cli.commands[n].short_help or '')} |" for n in names),
        "",
    ]
    parts += [command_doc(n, cli.commands[n], root) for n in names]
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is not what this would write")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing docs/cli.md")
    args = parser.parse_args()
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    elif args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC.relative_to(ROOT)} is out of date: run python scripts/cli_docs.py", file=sys.stderr)
            return 1
    else:
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
