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
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from llmprune import distributed
from llmprune.checkpoint import TensorReader, follow_umask, merge_files, read_grids, save_tensors, write_grids
from llmprune.errors import UsageError
from llmprune.quant import QuantParams
from llmprune.signals import deferred, note_progress

JOURNAL = "journal.json"
LOCK = ".lock"
VERSION = 1

log = logging.getLogger(__name__)

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class OutputLock:
    """One writer per output: ``DIR/.lock`` names the writer (pid, host) and is held under ``flock`` for as
    long as the run is. A second run on the same output is refused; a lock whose holder is gone (an flock
    nobody holds, naming a dead pid on this host) is taken over with a warning. A holder on another host cannot
    be checked from here: its lock stands until it is deleted."""

    def __init__(self, directory: Path, what: str):
        self.path = Path(directory) / LOCK
        self.what = what  # the output as the user named it, for the messages
        self._fd: int | None = None

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self, fd: int, holder: dict) -> UsageError:
        os.close(fd)
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
               if holder else "a process that has not written its name yet")
        return UsageError(f"{self.what} is being written by another run ({who}): wait for it or stop it; if it is"
                          f" gone, delete {self.path}")

    def acquire(self) -> None:
        import fcntl

        host, pid = socket.gethostname(), os.getpid()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._refuse(fd, self._holder(fd)) from None
            except OSError:  # a filesystem without flock: the pid and host below decide alone
                pass
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder released it (unlinked) while we waited for it: lock the new one
        holder = self._holder(fd)
        if holder and (holder.get("pid"), holder.get("host")) != (pid, host):
            if holder.get("host") != host or _pid_alive(int(holder.get("pid", 0))):
                raise self._refuse(fd, holder)
            log.warning("%s: taking over the lock of a run that is gone (pid %s on %s, since %s)", self.what,
                        holder.get("pid"), host, holder.get("since", "?"))
        me = json.dumps({"pid": pid, "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Unlink, then unlock (a run that opened the old file meanwhile sees it gone and locks a new one)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def sole_writer(directory: Path, what: str) -> Iterator[None]:
    """``directory/.lock`` held while the body runs: the one writer of an output that keeps no journal (a model
    compressed or shrunk in memory, a pack, a sweep). Under torchrun rank 0 holds it for every rank, and its
    refusal is every rank's. The directory, left empty (no other run's blocks in it), is removed afterwards."""
    directory = Path(directory)
    lock, error = None, None
    if distributed.is_main():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = OutputLock(directory, what)
            lock.acquire()
        except UsageError as exc:
            lock, error = None, str(exc)
    error = distributed.broadcast_object(error)
    try:
        if error is not None:
            raise UsageError(error)
        yield
    finally:
        if lock is not None:
            lock.release()
            with contextlib.suppress(OSError):  # not empty: an unfinished streamed run's blocks, kept
                directory.rmdir()


class PartialOutput:
    """``OUT.partial/``: per-block safetensors files (dense, the model dtype), their grids, and the journal."""

    def __init__(self, out: Path, spec: dict, readonly: bool = False):
        """``readonly``: a torchrun rank other than 0, which reads the journal rank 0 made and writes nothing."""
        self.out = Path(out).expanduser().resolve()
        self.dir = partial_dir(self.out)
        self.hash = spec_hash(spec)
        self.readonly = readonly
        self.lock: OutputLock | None = None
        self.total: int | None = None  # blocks in the model, for the message of an interrupted run
        path = self.dir / JOURNAL
        if readonly and not self.dir.exists():
            raise RuntimeError(f"{self.dir} was not created by rank 0 before the other ranks opened it")
        if not readonly:  # the lock first: no other run reads or writes the journal meanwhile
            self.dir.mkdir(parents=True, exist_ok=True)
            self.lock = OutputLock(self.dir, f"--out {self.out}")
            self.lock.acquire()
        try:
            # a directory holding no more than the lock: a run stopped before its journal was written
            if path.exists() or readonly or any(p.name != LOCK for p in self.dir.iterdir()):
                try:
                    journal = json.loads(path.read_text())
                except (OSError, ValueError):
                    raise UsageError(f"{self.dir} exists without a readable journal: delete it to start over"
                                     ) from None
                if journal.get("spec_hash") != self.hash:
                    old = journal.get("spec", {})
                    changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
                    raise UsageError(f"{self.dir} holds an unfinished run with a different spec"
                                     f" ({', '.join(changed)} differ): re-run that exact command to resume it, or"
                                     " delete the directory")
                self.journal = journal
            else:
                self.journal = {"version": VERSION, "spec_hash": self.hash, "spec": spec, "blocks": {},
                                "allocation": None}
                self._write_journal()
        except BaseException:
            self.close()
            raise

    def close(self, failed: bool = False) -> None:
        """Unlock (idempotent). ``failed`` before any block (or allocation) was done: the directory goes too,
        so a failed run leaves nothing behind."""
        journal = getattr(self, "journal", {})
        note_progress(len((self.journal_on_disk() if self.readonly else journal).get("blocks", {})), self.total)
        if self.lock is None:
            return
        if failed and journal and not journal["blocks"] and not journal.get("allocation"):
            shutil.rmtree(self.dir, ignore_errors=True)
        self.lock.release()
        self.lock = None

    def journal_on_disk(self) -> dict:
        """The journal as the disk holds it now (a torchrun rank other than 0 reads rank 0's progress)."""
        try:
            return json.loads((self.dir / JOURNAL).read_text())
        except (OSError, ValueError):
            return {}

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

    def extra(self, i: int) -> dict:
        """What else was journaled with finished block ``i`` (e.g. its reconstruction entry)."""
        return self.journal["blocks"][str(i)].get("extra", {})

    def finish_block(self, i: int, tensors: dict[str, Tensor], layers: list[dict],
                     grids: dict[str, QuantParams], extra: dict | None = None) -> None:
        """Write block ``i``'s tensors (and grids), then record it in the journal."""
        if self.readonly:
            return
        name = f"{self.block_prefix(i)}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        with deferred(), _disk_errors(self.dir):  # a signal meanwhile: this block is finished first
            try:
                save_tensors(tensors, tmp, metadata={"format": "pt"})
                _replace_atomically(tmp, self.dir / name)
            finally:
                tmp.unlink(missing_ok=True)
            if grids:
                gdir = self.dir / f"grids-{i:05d}"
                gdir.mkdir(exist_ok=True)
                write_grids(gdir, grids)
            self.journal["blocks"][str(i)] = {"file": name, "layers": layers} | ({"extra": extra} if extra else {})
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
        with deferred():  # from here no journal: the directory is renamed to OUT before a signal ends the run
            self._finish_publish(files, overwrite)
        return self.out

    def _finish_publish(self, files: list[str], overwrite: bool) -> None:
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
        if self.lock is not None:  # not part of the output; the run is complete
            self.lock.release()
            self.lock = None
        os.replace(self.dir, self.out)
