"""Perplexity by the SparseGPT protocol, streamed block by block like compression."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmprune import distributed
from llmprune.data import (
    batched,
    eval_windows,
    joined_text,
    load_documents,
    tokenize,
    window_layout,
    with_bos,
)
from llmprune.engine import Stream
from llmprune.errors import UsageError
from llmprune.loading import context_length
from llmprune.progress import Progress


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8,
               progress: Progress = True) -> float:
    """exp(mean over windows of the mean next-token NLL), windows (n, seqlen) non-overlapping.

    The batch is capped so one batch's logits stay under ~1 GB.
    """
    n, seqlen = windows.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = max(1, min(batch_size, (1 << 30) // (seqlen * vocab * 4)))
    if distributed.active() and n < distributed.world():
        raise UsageError(f"{n} evaluation windows cannot be shared by {distributed.world()} torchrun processes:"
                         " evaluate more windows or launch fewer")
    batches = batched(distributed.shard(windows), batch_size)  # torchrun: this rank's share
    stream = Stream(model, batches, device, progress=progress)
    stream.run(desc="eval")
    nlls = []
    with stream.non_block_modules_on_device(), torch.no_grad():
        for b, ids in enumerate(batches):
            # window by window through the head: a batch's fp32 logits, their shifted copy and log-softmax would
            # each be 0.8 GB for 8 x 512 tokens of a 49k vocabulary (the demo's peak)
            for i in range(ids.shape[0]):
                logits = stream.logits(b, slice(i, i + 1))[0].float()  # (seqlen, vocab)
                target = ids[i, 1:].to(logits.device)
                nlls.append(F.cross_entropy(logits[:-1], target, reduction="none").mean().reshape(1).cpu())
    per_window = torch.cat(nlls).double()
    total, count = distributed.all_sum([float(per_window.sum()), float(per_window.numel())])
    return math.exp(total / count)


def evaluation_windows(tokenizer, model: nn.Module, dataset: str, seqlen: int, max_windows: int | None = None,
                       split: str | None = None, text_field: str = "text",
                       bos: bool | None = None) -> tuple[torch.Tensor, dict]:
    """The SparseGPT protocol's windows of ``dataset`` for this model: (windows, {"dataset", "seqlen", "bos"}).

    seqlen is capped by the model's context; with BOS (by default when the tokenizer adds one) each window is
    BOS + seqlen − 1 text tokens; c4 is capped at 256 windows as in the protocol."""
    if seqlen < 2:
        raise UsageError(f"--seqlen {seqlen} is too short: use at least 2 tokens")
    docs, description = load_documents(dataset, split, text_field, "eval")
    seqlen, bos_id, width = window_layout(tokenizer, seqlen, context_length(model), bos)
    if dataset == "c4" and max_windows is None:
        max_windows = 256
    ids = tokenize(tokenizer, joined_text(docs, tokenizer))
    windows = with_bos(eval_windows(ids, width, dataset, max_windows), bos_id)
    return windows, {"dataset": description, "seqlen": seqlen, "bos": bos_id is not None}
