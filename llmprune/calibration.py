"""The calibration set of a run: its windows cut from the spec's documents, and their description."""

from __future__ import annotations

import torch
from torch import nn

from llmprune.data import (
    CalibSpec,
    calibration_windows,
    document_windows,
    joined_text,
    load_documents,
    tokenize,
    window_layout,
    windows_hash,
    with_bos,
)
from llmprune.errors import UsageError
from llmprune.loading import context_length


def calibration_set(tokenizer, model: nn.Module, spec: CalibSpec) -> tuple[torch.Tensor, dict]:
    """The calibration windows the spec asks for, and their description for the report."""
    if tokenizer is None:
        raise UsageError("no tokenizer to cut calibration windows with: pass --tokenizer ID_OR_DIR")
    docs, description = load_documents(spec.source, spec.split, spec.text_field)
    seqlen, bos, width = window_layout(tokenizer, spec.seqlen, context_length(model), spec.bos)
    if spec.by_document:
        windows = document_windows(docs, tokenizer, spec.nsamples, width, spec.seed, source=spec.source)
    else:
        ids = tokenize(tokenizer, joined_text(docs, tokenizer))
        windows = calibration_windows(ids, spec.nsamples, width, spec.seed, source=spec.source)
    windows = with_bos(windows, bos)
    info = {
        "source": description,
        "nsamples": spec.nsamples,
        "seqlen": seqlen,
        "seed": spec.seed,
        "bos": bos is not None,
        "by_document": spec.by_document,
        "tokens": int(windows.numel()),
        "sha256": windows_hash(windows),
    }
    return windows, info
