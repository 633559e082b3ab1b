"""docs/bad-input.md's table, row by row: each command run as written (MODEL, OUT, TEXT stand for the
``sharded`` fixture's model, a fresh output path and its calibration file; a condition in parentheses is made
first), and the one line it prints equal to the row's message (``…`` stands for a pid, host, time or number)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_faults import _damage, _with_nan_in_q_proj, one_line_error
from test_resume import run

TABLE = Path(__file__).parents[1] / "docs" / "bad-input.md"


def table_rows() -> list[tuple[str, str, str]]:
    """(command, condition or "", message) of each row of docs/bad-input.md's table."""
    text = TABLE.read_text()
    section = text[text.index("# Bad input"):]
    end = section.find("\n#", 5)
    section = section if end < 0 else section[:end]
    rows = []
    for line in section.splitlines():
        m = re.fullmatch(r"\| `llmprune ([^`]+)`(?: \(([^)]*)\))? \| `` (.+) `` \|", line.strip())
        if m:
            rows.append((m[1], m[2] or "", m[3]))
    return rows


def _quantized(model: Path, tmp: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))


def _no_tokenizer(model: Path, tmp: Path) -> None:
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()


def _absurd(model: Path, tmp: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 10**9}))


def _lock_held(model: Path, tmp: Path) -> None:
    (tmp / "out.partial").mkdir()
    (tmp / "out.partial" / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "since": "then"}))


def _out_not_empty(model: Path, tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")


def _bare_tokenizer(model: Path, tmp: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(model)
    _no_tokenizer(model, tmp)
    PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer).save_pretrained(model)


def _short_text(model: Path, tmp: Path) -> None:
    (tmp / "short.txt").write_text("To be, or not to be.")


def _rows_file(model: Path, tmp: Path) -> None:
    (tmp / "rows.jsonl").write_text("\n".join(json.dumps({"body": "Some text. " * 40}) for _ in range(8)))


def _recipe_file(model: Path, tmp: Path) -> None:
    (tmp / "recipe.yaml").write_text("sparsity: 0.5\nsparsty: 0.6\n")


def _damaged(how: str) -> Callable[[Path, Path], None]:
    return lambda model, tmp: _damage(model, how)


CONDITIONS: dict[str, Callable[[Path, Path], None]] = {  # a row's condition -> how the test makes it
    "OUT holds a file": _out_not_empty,
    "a config.json with quantization_config": _quantized,
    "MODEL without tokenizer files": _no_tokenizer,
    "a config.json giving 10⁹ layers": _absurd,
    "another live run holds OUT": _lock_held,
    "a tokenizer without BOS": _bare_tokenizer,
    "a text of a few words": _short_text,
    "rows without a text field": _rows_file,
    "a misspelt key": _recipe_file,
    "a weight holding a NaN": lambda model, tmp: _with_nan_in_q_proj_here(model),
    "a shard whose header gives offsets past its end": _damaged("offsets past the end"),
    "a shard whose header gives a dtype of another size": _damaged("a dtype of another size"),
    "a shard whose header gives a weight an integer dtype": _damaged("an integer dtype of the same size"),
    "a shard the index names is missing": _damaged("a missing shard"),
    "a broken index": _damaged("a broken index"),
}


def _with_nan_in_q_proj_here(model: Path) -> None:
    copy = model.parent / "nan-src"
    model.rename(copy)
    _with_nan_in_q_proj(copy, model)
    shutil.rmtree(copy)


CALIBRATED = ("compress", "shrink")  # the test adds a small calibration set where the row gives none


def test_the_table_lists_every_condition_the_tests_make():
    conditions = {c for _, c, _ in table_rows()}
    assert len(table_rows()) >= 30
    assert set(CONDITIONS) == conditions - {""}


@pytest.mark.parametrize(("command", "condition", "message"), table_rows(),
                         ids=[f"{c} ({k})" if k else c for c, k, _ in table_rows()])
def test_each_bad_input_prints_the_documented_message(sharded, tmp_path, capsys, monkeypatch, command, condition,
                                                  message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite's own setting: a user's shell has none
    model = tmp_path / "model"
    shutil.copytree(sharded / "model", model)
    if condition:
        CONDITIONS[condition](model, tmp_path)
    subs = {"MODEL": str(model), "OUT": str(tmp_path / "out"), "TEXT": str(sharded / "calib.txt"),
            "TMP": str(tmp_path)}
    pattern = re.compile(r"\b(MODEL|OUT|TEXT|TMP)\b")
    argv = [pattern.sub(lambda m: subs[m[1]], a) for a in shlex.split(command)]
    if argv[0] in CALIBRATED and "--calib" not in argv:
        argv += ["--calib", subs["TEXT"]]
    if argv[0] in CALIBRATED:
        argv += ["--nsamples", "8", "--seqlen", "64", "--device", "cpu"]
    assert run(argv) == 2
    line = one_line_error(capsys.readouterr().err).removeprefix("llmprune: error: ")
    expect = "".join(".+?" if part == "…" else re.escape(part)
                     for part in re.split(r"(…)", pattern.sub(lambda m: subs[m[1]], message)))
    assert re.fullmatch(expect, line), f"\ndocs/bad-input.md: {message}\nprinted: {line}"
    assert not (tmp_path / "out").exists() or condition == "OUT holds a file"


def test_the_table_is_what_the_cli_prints_from_a_shell(sharded, tmp_path):
    """One row through a real process too: the message is on stderr, alone, with exit 2."""
    done = subprocess.run([sys.executable, "-m", "llmprune", "compress", str(tmp_path / "nothing"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"llmprune: error: model path {str(tmp_path / 'nothing')!r} does not exist: check" \
                                  " the path"
