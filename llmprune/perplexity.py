"""Perplexity by the SparseGPT protocol, streamed block by block like compression."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.data import batched
from llmprune.engine import Stream
from llmprune.progress import Progress


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8,
               progress: Progress = True) -> float:
    """exp(mean over windows of the mean next-token NLL), windows (n, seqlen) non-overlapping.

    The batch is capped so one batch's logits stay under ~1 GB.
    """
    n, seqlen = windows.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = max(1, min(batch_size, (1 << 30) // (seqlen * vocab * 4)))
    batches = batched(windows, batch_size)
    stream = Stream(model, batches, device, progress=progress)
    stream.run(desc="eval")
    nlls = []
    with stream.non_block_modules_on_device(), torch.no_grad():
        for b, ids in enumerate(batches):
            logits = stream.logits(b).float()  # (b, seqlen, vocab)
            ids = ids.to(logits.device)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            nlls.append(loss.view(ids.shape[0], seqlen - 1).mean(1).cpu())
    return math.exp(torch.cat(nlls).double().mean().item())
