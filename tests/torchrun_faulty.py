"""A torchrun worker for test_torchrun: llmprune's CLI, but rank 1 is SIGKILLed once the block given by
LLMPRUNE_TEST_DIE_AFTER is finished (the fault the test injects; not part of llmprune)."""

import os
import signal
import sys

from llmprune import compression
from llmprune.cli import main

die_after = int(os.environ["LLMPRUNE_TEST_DIE_AFTER"])
real = compression.compress_block


def compress_block(block_prefix, *args, **kwargs):
    if os.environ.get("RANK") == "1" and block_prefix.endswith(f".{die_after + 1}"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(block_prefix, *args, **kwargs)


compression.compress_block = compress_block
sys.exit(main(sys.argv[1:]))
