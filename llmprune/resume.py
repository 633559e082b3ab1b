"""Resumable output: ``OUT.partial/`` receives each finished block as it is done, with a journal; re-running the
same command after a crash, Ctrl-C or SIGKILL continues from the first unfinished block; on success the
directory is completed (index, config, tokenizer, report) and renamed to ``OUT``.

Every file is written under a temporary name, fsynced and renamed, and the journal is rewritten the same way
after the block's files, so a kill at any instant leaves either the old or the new state. The journal holds a
hash of the spec (recipe, calibration windows, input model); a different spec refuses to resume.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from llmprune.checkpoint import TensorReader, follow_umask, merge_files, read_grids, save_tensors, write_grids
from llmprune.errors import UsageError
from llmprune.quant import QuantParams

JOURNAL = "journal.json"
VERSION = 1


def partial_dir(out: Path) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f"{out.name}.partial"


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _disk_errors(where: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UsageError(f"disk full while writing {where}: free some space, then re-run the same command"
                             " to resume from the last finished block") from None
        raise


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class PartialOutput:
    """``OUT.partial/``: per-block safetensors files (dense, the model dtype), their grids, and the journal."""

    def __init__(self, out: Path, spec: dict, readonly: bool = False):
        """``readonly``: a torchrun rank other than 0, which reads the journal rank 0 made and writes nothing."""
        self.out = Path(out).expanduser().resolve()
        self.dir = partial_dir(self.out)
        self.hash = spec_hash(spec)
        self.readonly = readonly
        path = self.dir / JOURNAL
        if self.dir.exists():
            try:
                journal = json.loads(path.read_text())
            except (OSError, ValueError):
                raise UsageError(f"{self.dir} exists without a readable journal: delete it to start over") from None
            if journal.get("spec_hash") != self.hash:
                old = journal.get("spec", {})
                changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
                raise UsageError(f"{self.dir} holds an unfinished run with a different spec ({', '.join(changed)}"
                                 " differ): re-run that exact command to resume it, or delete the directory")
            self.journal = journal
        else:
            if readonly:
                raise RuntimeError(f"{self.dir} was not created by rank 0 before the other ranks opened it")
            self.dir.mkdir(parents=True)
            self.journal = {"version": VERSION, "spec_hash": self.hash, "spec": spec, "blocks": {},
                            "allocation": None}
            self._write_journal()

    # -- journal -----------------------------------------------------------------------------------------
    def _write_journal(self) -> None:
        if self.readonly:
            return
        tmp = self.dir / f".{JOURNAL}.tmp"
        with _disk_errors(self.dir):
            try:
                tmp.write_text(json.dumps(self.journal, default=str))
                _replace_atomically(tmp, self.dir / JOURNAL)
            finally:
                tmp.unlink(missing_ok=True)

    @property
    def finished(self) -> list[int]:
        return sorted(int(i) for i in self.journal["blocks"])

    def done(self, i: int) -> bool:
        return str(i) in self.journal["blocks"]

    def layers(self, i: int) -> list[dict]:
        return self.journal["blocks"][str(i)]["layers"]

    @property
    def allocation(self) -> dict | None:
        return self.journal.get("allocation")

    def set_allocation(self, allocation: dict | None) -> None:
        self.journal["allocation"] = allocation
        self._write_journal()

    # -- blocks ------------------------------------------------------------------------------------------
    @staticmethod
    def block_prefix(i: int) -> str:
        return f"model-block-{i:05d}"

    def reader(self, i: int) -> TensorReader:
        return TensorReader(self.dir, prefix=self.block_prefix(i))

    def grids(self, i: int) -> dict[str, QuantParams]:
        d = self.dir / f"grids-{i:05d}"
        return read_grids(d) if d.is_dir() else {}

    def finish_block(self, i: int, tensors: dict[str, Tensor], layers: list[dict],
                     grids: dict[str, QuantParams]) -> None:
        """Write block ``i``'s tensors (and grids), then record it in the journal."""
        if self.readonly:
            return
        name = f"{self.block_prefix(i)}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        with _disk_errors(self.dir):
            try:
                save_tensors(tensors, tmp, metadata={"format": "pt"})
                _replace_atomically(tmp, self.dir / name)
            finally:
                tmp.unlink(missing_ok=True)
            if grids:
                gdir = self.dir / f"grids-{i:05d}"
                gdir.mkdir(exist_ok=True)
                write_grids(gdir, grids)
        self.journal["blocks"][str(i)] = {"file": name, "layers": layers}
        self._write_journal()

    def publish(self, rest: dict[str, Tensor], write_meta, overwrite: bool, convert=None,
                kept: list[int] | None = None, max_shard_bytes: int = 2 * 1024**3) -> Path:
        """Complete the directory (``rest`` = tensors outside the blocks; ``write_meta(dir)`` writes config,
        tokenizer, report, ...) and rename it to ``OUT``. The blocks' files and ``rest`` are merged into shards
        of at most ``max_shard_bytes`` (checkpoint.merge_files: a small model is one ``model.safetensors``).

        ``convert(i, tensors, grids) -> tensors``, when given, rewrites each finished block's file for the
        output format (compressed-tensors packs its quantized linears; shrink renumbers the kept blocks), one
        block in memory at a time; the blocks' own files stay until the output is complete, so an interrupted
        publish can be redone. ``kept``: the finished blocks that go into the output (shrink's dropped blocks
        do not; needs ``convert``), default all.
        """
        publish_blocks = self.finished if kept is None else kept
        if kept is not None and convert is None:
            raise ValueError("publishing some blocks only needs a convert that renames them")
        with _disk_errors(self.dir):
            save_tensors(rest, self.dir / "model-rest.safetensors", metadata={"format": "pt"})
            blocks = [f"{self.block_prefix(i)}.safetensors" for i in publish_blocks]
            if convert is not None:
                converted = []
                for i, fname in zip(publish_blocks, blocks, strict=True):
                    reader = TensorReader(self.dir, prefix=fname.removesuffix(".safetensors"))
                    tensors = convert(i, {k: reader.get(k) for k in reader.keys()}, self.grids(i))
                    reader.close()
                    converted.append(f"model-out-{i:05d}.safetensors")
                    save_tensors(tensors, self.dir / converted[-1], metadata={"format": "pt"})
                    del tensors
                blocks = converted
            files = blocks + ["model-rest.safetensors"]
            merge_files(self.dir, files, max_shard_bytes)
            grids: dict[str, QuantParams] = {}
            for i in self.finished:
                grids.update(self.grids(i))
            if grids and convert is None:  # dense output keeps them, so it can be packed later
                write_grids(self.dir, grids)
            write_meta(self.dir)
        (self.dir / JOURNAL).unlink()
        for i in self.finished:
            shutil.rmtree(self.dir / f"grids-{i:05d}", ignore_errors=True)
        for fname in {f"{self.block_prefix(i)}.safetensors" for i in self.finished} | set(files):
            (self.dir / fname).unlink(missing_ok=True)
        follow_umask(self.dir)
        if self.out.exists():
            if not overwrite and any(self.out.iterdir()):
                raise UsageError(f"--out {self.out} appeared while compressing: the result stays in {self.dir}")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(self.dir, self.out)
        return self.out
