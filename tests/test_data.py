"""Calibration and evaluation data as users bring it: BOS, per-document windows, datasets by name and field,
chats, local splits, a tokenizer from elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import requires_smollm2

import llmprune
from llmprune.cli import main
from llmprune.data import builtin_text_path, load_documents

TEXT = builtin_text_path().read_text()[:80_000]
SMALL = dict(nsamples=4, seqlen=32, device="cpu", progress=False)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer, tmp_path_factory):
    """The tiny tokenizer made to start every encoding with a BOS token, as Gemma's and Llama's do."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    inner.add_special_tokens(["<bos>"])
    bos = inner.token_to_id("<bos>")
    inner.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", eos_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}")
    d = tmp_path_factory.mktemp("bos-tok")
    tok.save_pretrained(d)
    assert tok("a").input_ids[0] == bos
    return tok


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    paras = [p for p in TEXT.split("\n\n") if p.strip()]
    long_docs = ["\n".join(paras[i : i + 12]) for i in range(0, 240, 12)]  # 20 documents of 12 speeches
    short = ["a short one", "tiny"]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in long_docs + short))
    (d / "content.json").write_text(json.dumps([{"content": x, "id": i} for i, x in enumerate(long_docs)]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": long_docs}), d / "docs.parquet")
    chats = [{"messages": [{"role": "user", "content": paras[i]}, {"role": "assistant", "content": paras[i + 1]}]}
             for i in range(0, 80, 2)]
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    hf = d / "hfdir"
    hf.mkdir()
    (hf / "train.jsonl").write_text("".join(json.dumps({"content": x}) + "\n" for x in long_docs))
    (d / "plain.txt").write_text(TEXT)
    return {"dir": d, "jsonl": d / "docs.jsonl", "json": d / "content.json", "parquet": d / "docs.parquet",
            "chat": d / "chat.jsonl", "hf": hf, "txt": d / "plain.txt", "docs": long_docs}


@pytest.fixture(scope="module")
def bos_model_dir(bos_tokenizer, tmp_path_factory) -> Path:
    """A tiny llama whose vocabulary holds the BOS token's id (321)."""
    from conftest import TINY
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("bos-model")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(bos_tokenizer), max_position_embeddings=128,
                                  **TINY["llama"])
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    bos_tokenizer.save_pretrained(d)
    return d


def test_windows_start_with_bos_when_the_tokenizer_adds_one(bos_model_dir, bos_tokenizer, files, tmp_path):
    report = llmprune.compress(bos_model_dir, tmp_path / "a", calib=str(files["txt"]), **SMALL)
    assert report.calibration["bos"] is True and report.calibration["seqlen"] == 32
    from llmprune.calibration import calibration_set
    from llmprune.recipe import Recipe

    model, tok = llmprune.load(bos_model_dir)
    calib = Recipe(calib=str(files["txt"]), nsamples=4, seqlen=32).resolve().calibration
    windows, info = calibration_set(tok, model, calib)
    assert windows.shape == (4, 32) and bool((windows[:, 0] == tok.bos_token_id).all())
    assert not bool((windows[:, 1:] == tok.bos_token_id).any())
    assert info["sha256"] == report.calibration["sha256"]
    calib = Recipe(calib=str(files["txt"]), nsamples=4, seqlen=32, bos=False).resolve().calibration
    plain, info = calibration_set(tok, model, calib)
    assert info["bos"] is False and not bool((plain == tok.bos_token_id).any())
    # evaluation alike: every window BOS + 31 text tokens; --no-bos is the plain protocol
    with_bos = llmprune.evaluate(bos_model_dir, str(files["txt"]), seqlen=32, max_windows=4, device="cpu",
                                 progress=False)
    without = llmprune.evaluate(bos_model_dir, str(files["txt"]), seqlen=32, max_windows=4, device="cpu", bos=False,
                                progress=False)
    assert with_bos["bos"] is True and without["bos"] is False and with_bos["ppl"] != without["ppl"]


def test_a_tokenizer_without_bos_gets_none(tiny_model_dir, files, tmp_path):
    report = llmprune.compress(tiny_model_dir, tmp_path / "a", calib=str(files["txt"]), **SMALL)
    assert report.calibration["bos"] is False
    with pytest.raises(llmprune.UsageError, match="adds no BOS"):
        llmprune.compress(tiny_model_dir, tmp_path / "b", calib=str(files["txt"]), bos=True, **SMALL)


@requires_smollm2
def test_smollm2_tokenizer_adds_no_bos(smollm2):
    from llmprune.data import bos_token_id

    _, tok, _ = smollm2
    assert bos_token_id(tok) is None  # SmolLM2 is trained without one: its windows stay as they were


def test_by_document_windows_come_from_one_long_enough_document(tiny_tokenizer, files):
    from llmprune.data import document_windows

    docs, _ = load_documents(str(files["jsonl"]))
    windows = document_windows(docs, tiny_tokenizer, 16, 64, seed=3)
    assert windows.shape == (16, 64)
    for w in windows:
        text = tiny_tokenizer.decode(w)
        assert sum(text in d for d in files["docs"]) >= 1  # a slice of one document, never across two
    again = document_windows(docs, tiny_tokenizer, 16, 64, seed=3)
    assert torch.equal(windows, again)
    with pytest.raises(llmprune.UsageError, match="no document"):
        document_windows(docs, tiny_tokenizer, 2, 100_000, seed=0)


def test_compress_reads_the_calibration_source_once(tiny_model_dir, files, tmp_path, monkeypatch):
    import llmprune.data as data

    load_documents.cache_clear()
    calls = []
    real = data._local_rows
    monkeypatch.setattr(data, "_local_rows", lambda p: calls.append(p) or real(p))
    report = llmprune.compress(tiny_model_dir, tmp_path / "a", calib=str(files["jsonl"]), by_document=True, **SMALL)
    assert len(calls) == 1 and report.calibration["by_document"] is True


@pytest.mark.parametrize("kind,field", [("json", "content"), ("parquet", "body"), ("hf", "content")])
def test_rows_from_json_parquet_and_datasets_by_name(kind, field, tiny_model_dir, files, tmp_path):
    source = f"hf:{files['hf']}" if kind == "hf" else str(files[kind])
    docs, description = load_documents(source, "train", field)
    assert len(docs) > 1 and all(d in files["docs"] for d in docs)
    report = llmprune.compress(tiny_model_dir, tmp_path / kind, calib=source, split="train", text_field=field,
                               **SMALL)
    assert report.calibration["source"] == description
    with pytest.raises(llmprune.UsageError, match="text-field"):
        load_documents(source, "train", "nope")


def test_local_splits_are_disjoint(files):
    train, _ = load_documents(str(files["jsonl"]), "train")
    test, _ = load_documents(str(files["jsonl"]), "test")
    every, _ = load_documents(str(files["jsonl"]), "all")
    assert list(train) + list(test) == list(every) and train and test
    with pytest.raises(llmprune.UsageError, match="--split"):
        load_documents(str(files["jsonl"]), "validation")


def test_chats_are_rendered_with_the_chat_template(bos_model_dir, bos_tokenizer, files, tmp_path):
    from llmprune.data import joined_text

    docs, _ = load_documents(str(files["chat"]))
    text = joined_text(docs, bos_tokenizer)
    assert text.count("<|user|>") == len(docs) and "<|assistant|>" in text
    report = llmprune.compress(bos_model_dir, tmp_path / "c", calib=str(files["chat"]), **SMALL)
    assert report.calibration["bos"] is True
    with pytest.raises(llmprune.UsageError, match="chat template"):
        from llmprune.data import render

        class NoTemplate:
            chat_template = None

        render(docs[0], NoTemplate())


def test_eval_on_the_calibration_file_warns(tiny_model_dir, files, tmp_path, caplog):
    out = tmp_path / "m"
    llmprune.compress(tiny_model_dir, out, calib=str(files["txt"]), **SMALL)
    llmprune.evaluate(out, str(files["txt"]), seqlen=32, max_windows=2, device="cpu", progress=False)
    assert "which this model was calibrated on" in caplog.text
    caplog.clear()
    out2 = tmp_path / "m2"
    llmprune.compress(tiny_model_dir, out2, calib=str(files["txt"]), split="train", **SMALL)
    llmprune.evaluate(out2, str(files["txt"]), split="test", seqlen=32, max_windows=2, device="cpu", progress=False)
    assert "which this model was calibrated on" not in caplog.text


def test_a_model_directory_without_a_tokenizer(tiny_model_dir, files, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("model", "config", "generation")):
            shutil.copy2(f, bare / f.name)
    args = ["compress", str(bare), "--out", str(tmp_path / "o"), "--calib", str(files["txt"]), "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "/s]" not in ln]
    assert exc.value.code == 2 and len(err) == 1 and "--tokenizer" in err[0]
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--tokenizer", str(tiny_model_dir)])
    assert exc.value.code == 0 and (tmp_path / "o" / "config.json").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["eval-ppl", str(bare), "--dataset", str(files["txt"]), "--seqlen", "32", "--max-windows", "2"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "/s]" not in ln]
    assert exc.value.code == 2 and "--tokenizer" in err[-1]


def test_revision_and_trust_remote_code_reach_transformers(monkeypatch):
    from llmprune import hub
    from llmprune.loading import resolve

    monkeypatch.setattr(hub, "offline", lambda: None)  # as online: an uncached id is left to from_pretrained

    mref = resolve("someone/model", revision="v2", trust_remote_code=True)
    assert mref.kwargs == {"revision": "v2", "trust_remote_code": True}
    assert resolve("someone/model").kwargs == {}


def test_more_samples_than_distinct_windows_is_warned(caplog):
    import logging

    from llmprune.data import calibration_windows

    ids = torch.arange(1000)
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        calibration_windows(ids, 8, 100, 0, source="small.txt")
    assert not caplog.text
    with caplog.at_level(logging.WARNING, logger="llmprune"):
        calibration_windows(ids, 20, 100, 0, source="small.txt")
    assert "--nsamples 20 asks for more windows than the 10 distinct" in caplog.text
