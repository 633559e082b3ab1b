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


def peer_setup(work, nsamples: int, seqlen: int, eval_count: int, dtype: str = "auto"):
    """What a benchmark against another tool shares with it: SmolLM2 saved as a model directory under ``work``
    (``dtype``: of the saved weights), the calibration windows llmprune draws for it (saved as
    ``work/windows.pt`` for the peer) and the held-out windows. Returns (model_dir, tokenizer, windows, the
    calibration's description, held-out windows)."""
    import llmprune
    from llmprune.lazy import load_lazy
    from llmprune.perplexity import evaluation_windows

    model_dir = work / "smollm2"
    model, tok = llmprune.load("smollm2-135m", dtype=dtype)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    lazy, _ = load_lazy(model_dir, dtype)
    windows, calib = calibration_set(tok, lazy, Recipe(calib="shakespeare", nsamples=nsamples,
                                                       seqlen=seqlen).resolve().calibration)
    torch.save(windows, work / "windows.pt")
    ev, _ = evaluation_windows(tok, lazy, "shakespeare", seqlen, eval_count)
    return model_dir, tok, windows, calib, ev
