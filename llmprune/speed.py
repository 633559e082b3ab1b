"""``llmprune bench-speed``: prefill and decode throughput of models side by side, with plain transformers.

A tool on the API (it loads models as ``llmprune.load`` does), not part of it.
"""

from __future__ import annotations

import statistics
import time
from inspect import signature
from pathlib import Path

import torch

from llmprune import distributed
from llmprune.api import load
from llmprune.engine import resolve_device
from llmprune.shrinking import count_params


def bench_speed(models: list[str | Path], *, tokens: int = 512, batch: int = 1, new_tokens: int = 32,
                repeats: int = 5, device: str = "auto", dtype: str = "auto") -> list[dict]:
    """Prefill and decode tokens/s of each model with plain transformers, the same inputs for all, repeats
    interleaved across the models, medians. Rows: model, params, prefill_tok_s, decode_tok_s.

    Prefill is the prompt's forward as ``generate`` runs it (KV cache filled, logits of the last position
    only): the time to the first token. Decode: ``new_tokens`` greedy tokens after a 16-token prompt."""
    dev = distributed.device() or resolve_device(device)
    loaded = []
    for ref in models:
        m, _ = load(ref, device=str(dev), dtype=dtype)
        loaded.append((str(ref), m))
    vocab = min(m.config.vocab_size for _, m in loaded)
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    times: dict[str, dict[str, list[float]]] = {r: {"prefill": [], "decode": []} for r, _ in loaded}
    # prefill as generation runs it: the prompt's KV cache filled and only the last position's logits
    # computed (a model without ``logits_to_keep`` computes them all, as it would when generating)
    prefill_kwargs = {ref: {"use_cache": True} | ({"logits_to_keep": 1} if "logits_to_keep" in
                      signature(m.forward).parameters else {}) for ref, m in loaded}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.no_grad():
        for rep in range(repeats + 1):  # the first round warms up and is not counted
            for ref, m in loaded:
                sync()
                t = time.perf_counter()
                m(input_ids=ids, **prefill_kwargs[ref])
                sync()
                prefill = time.perf_counter() - t
                t = time.perf_counter()
                m.generate(ids[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=0)
                sync()
                decode = time.perf_counter() - t
                if rep:
                    times[ref]["prefill"].append(batch * tokens / prefill)
                    times[ref]["decode"].append(batch * new_tokens / decode)
    return [{"model": ref, "params": count_params(m),
             "prefill_tok_s": statistics.median(times[ref]["prefill"]),
             "decode_tok_s": statistics.median(times[ref]["decode"])} for ref, m in loaded]
