"""A torchrun worker for test_torchrun: llmprune's CLI, counting the checkpoint tensors this rank reads from
the shards into LLMPRUNE_TEST_READS/rank<R>.txt (what the test inspects; not part of llmprune)."""

import atexit
import os
import sys
from pathlib import Path

from llmprune.checkpoint import TensorReader
from llmprune.cli import main

reads = [0]
real = TensorReader.get


def get(self, key):
    reads[0] += 1
    return real(self, key)


TensorReader.get = get
atexit.register(lambda: (Path(os.environ["LLMPRUNE_TEST_READS"]) / f"rank{os.environ['RANK']}.txt")
                .write_text(str(reads[0])))
sys.exit(main(sys.argv[1:]))
