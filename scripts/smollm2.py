"""The SmolLM2-135M benchmarks' common setup: the built-in model, its pristine weights, calibration windows
from the Shakespeare train part and held-out windows from its tail, the same for every row of a table."""

from __future__ import annotations

import copy

import torch

from llmprune.calibration import calibration_set
from llmprune.data import eval_windows, load_text, tokenize
from llmprune.loading import load_model
from llmprune.recipe import Recipe


def setup(nsamples: int, seqlen: int, eval_count: int = 16):
    """(model, tokenizer, pristine state dict, base recipe, calibration windows, held-out windows)."""
    model, tokenizer, _ = load_model("smollm2-135m")
    pristine = copy.deepcopy(model.state_dict())
    base = Recipe(calib="shakespeare", nsamples=nsamples, seqlen=seqlen, device="cpu")
    windows, _ = calibration_set(tokenizer, model, base.resolve().calibration)
    held_out = eval_windows(tokenize(tokenizer, load_text("shakespeare", "test")[0]), seqlen, max_windows=eval_count)
    return model, tokenizer, pristine, base, windows, held_out


CPU = torch.device("cpu")
