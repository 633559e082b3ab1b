"""Writing checkpoints: a Hugging Face model directory plus ``llmprune.json``, published atomically.

Everything is written to a hidden sibling directory first and renamed into place only when complete, so a
crash or Ctrl-C never leaves a half-written ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch import nn

REPORT = "llmprune.json"


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_hf(model: nn.Module, tokenizer, directory: Path, report: dict, max_shard_size: str = "2GB") -> None:
    """Sharded safetensors, config, generation config, tokenizer, and the run report."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_report(directory, report)


def write_report(directory: Path, report: dict) -> None:
    (directory / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")


def read_report(directory: Path) -> dict | None:
    path = Path(directory) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None
