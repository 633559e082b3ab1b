"""A torchrun worker for test_torchrun: llmprune's CLI, counting the checkpoint tensors this rank reads from
the shards into LLMPRUNE_TEST_READS/rank<R>.txt and the calibration windows this rank streams through the
blocks into .../windows<R>.txt (what the tests inspect; not part of llmprune)."""

import atexit
import os
import sys
from pathlib import Path

from llmprune.checkpoint import TensorReader
from llmprune.cli import main
from llmprune.engine import Stream

reads = [0]
windows = [0]
real_get, real_stream = TensorReader.get, Stream.__init__


def get(self, key):
    reads[0] += 1
    return real_get(self, key)


def stream(self, model, batches, *args, **kwargs):
    windows[0] = max(windows[0], sum(b.shape[0] for b in batches))
    real_stream(self, model, batches, *args, **kwargs)


def write() -> None:
    out, rank = Path(os.environ["LLMPRUNE_TEST_READS"]), os.environ["RANK"]
    (out / f"rank{rank}.txt").write_text(str(reads[0]))
    (out / f"windows{rank}.txt").write_text(str(windows[0]))


TensorReader.get = get
Stream.__init__ = stream
atexit.register(write)
sys.exit(main(sys.argv[1:]))
