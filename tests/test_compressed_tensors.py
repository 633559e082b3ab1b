"""Interop: our pack-quantized checkpoints, read by the real compressed-tensors package and by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import compress_args, run

ct = pytest.importorskip("compressed_tensors")


def _compress_both(tiny_model_dir, calib, tmp_path, capsys, *flags):
    """The same recipe written dense and as compressed-tensors (the run is deterministic)."""
    outs = {}
    for fmt in ("dense", "compressed-tensors"):
        outs[fmt] = tmp_path / fmt
        code, _, err = run(compress_args(tiny_model_dir, outs[fmt], calib, "--format", fmt, *flags), capsys)
        assert code == 0, err
    return outs["dense"], outs["compressed-tensors"]


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def calib(tmp_path):
    from llmprune.data import builtin_text_path

    p = tmp_path / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


FLAGS = {
    "gptq-4bit-channel": ["--wbits", "4"],
    "joint-50-4bit-g32": ["--sparsity", "0.5", "--wbits", "4", "--group-size", "32"],
    "joint-2of4-3bit-g16-actorder": ["--sparsity", "0.3", "--wbits", "3", "--group-size", "16", "--act-order"],
    "asym-8bit-g32-mse": ["--pattern", "2:4", "--wbits", "8", "--group-size", "32", "--asym", "--quant-search", "mse"],
    "wanda-then-rtn-2bit": ["--method", "wanda", "--wbits", "2", "--asym"],
    # reconstruction trains the grids' scales: the checkpoint must carry the trained ones
    "gptq-4bit-g32-reconstruct": ["--wbits", "4", "--group-size", "32", "--reconstruct", "4"],
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_compressed_tensors_decompresses_to_our_dense_weights(case, tiny_model_dir, calib, tmp_path, capsys):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    dense_dir, ct_dir = _compress_both(tiny_model_dir, calib, tmp_path, capsys, *FLAGS[case])
    qcfg = QuantizationConfig.model_validate(json.loads((ct_dir / "config.json").read_text())["quantization_config"])
    scheme = qcfg.config_groups["group_0"]
    dense, packed = _tensors(dense_dir), _tensors(ct_dir)
    layers = [k.removesuffix(".weight_packed") for k in packed if k.endswith(".weight_packed")]
    assert len(layers) == 14  # every linear of the blocks; lm_head stays dense and is ignored
    assert "lm_head" in qcfg.ignore
    for name in layers:
        local = {k.removeprefix(name + "."): v for k, v in packed.items() if k.startswith(name + ".")}
        out = PackedQuantizationCompressor.decompress(local, scheme)
        assert torch.equal(out["weight"], dense[f"{name}.weight"]), name
    report = json.loads((ct_dir / "llmprune.json").read_text())
    numel = sum(r["shape"][0] * r["shape"][1] for r in report["layers"])
    mean_bits = sum(r["bits"] * r["shape"][0] * r["shape"][1] for r in report["layers"]) / numel
    assert report["checkpoint"]["bits_per_weight"] == pytest.approx(mean_bits)
    assert scheme.weights.num_bits < mean_bits
    for layer in report["layers"]:
        assert layer["quant_error"] is None or 0 <= layer["quant_error"] <= layer["rel_error"]


@pytest.mark.parametrize("case", ["gptq-4bit-channel", "joint-50-4bit-g32", "joint-2of4-3bit-g16-actorder"])
def test_transformers_loads_it_with_the_same_logits(case, tiny_model_dir, calib, tmp_path, capsys):
    """Symmetric schemes only: transformers 5.x cannot load asymmetric pack-quantized checkpoints (its packed
    zero point is re-initialised with the unpacked shape; vllm-project/llm-compressor#1618)."""
    from transformers import AutoModelForCausalLM

    dense_dir, ct_dir = _compress_both(tiny_model_dir, calib, tmp_path, capsys, *FLAGS[case])
    a = AutoModelForCausalLM.from_pretrained(dense_dir)
    b = AutoModelForCausalLM.from_pretrained(ct_dir)
    ids = torch.randint(0, a.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    packed = sum(f.stat().st_size for f in ct_dir.glob("*.safetensors"))
    assert packed < sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))


def test_compressed_tensors_streams_block_by_block_and_equals_the_whole_model_run(tiny_model_dir, calib, tmp_path,
                                                                                    capsys):
    flags = ["--format", "compressed-tensors", "--sparsity", "0.5", "--wbits", "4", "--group-size", "32"]
    code, _, err = run(compress_args(tiny_model_dir, tmp_path / "lazy", calib, *flags), capsys)
    assert code == 0, err
    code, _, err = run(compress_args(tiny_model_dir, tmp_path / "whole", calib, "--no-lazy", *flags), capsys)
    assert code == 0, err
    lazy, whole = json.loads((tmp_path / "lazy" / "llmprune.json").read_text()), \
        json.loads((tmp_path / "whole" / "llmprune.json").read_text())
    assert lazy["model"]["lazy"] is True and "lazy" not in whole["model"]
    a, b = _tensors(tmp_path / "lazy"), _tensors(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qa = json.loads((tmp_path / "lazy" / "config.json").read_text())["quantization_config"]
    qb = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    assert qa == qb
    assert lazy["checkpoint"]["bits_per_weight"] == pytest.approx(whole["checkpoint"]["bits_per_weight"])
    for d, r in (("lazy", lazy), ("whole", whole)):  # the bytes of the files written, not of what was beside them
        assert r["checkpoint"]["bytes"] == sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")), d
    assert sorted(f.name for f in (tmp_path / "lazy").iterdir() if f.name.startswith(("model-block", "grids")))\
        == []  # only the output's own files are left


def test_streamed_and_in_memory_runs_write_the_same_checkpoint_through_one_writer(tiny_model_dir, calib, tmp_path,
                                                                                 capsys):
    """Asymmetric (packed zero points) and act-order: both runs pack with checkpoint.PackQuantizedWriter, so
    every file but the weights' and the report is the same bytes (config.json with its quantization_config,
    the tokenizer's), the weights hold the same tensors bit for bit under the same names, dtypes and shapes,
    and the report's size figures agree exactly. (The weight file itself is ordered differently: a streamed
    run writes the blocks, then the rest.)"""
    flags = ["--format", "compressed-tensors", "--sparsity", "0.3", "--wbits", "3", "--group-size", "16", "--asym",
             "--act-order"]
    for d, extra in (("lazy", []), ("whole", ["--no-lazy"])):
        code, _, err = run(compress_args(tiny_model_dir, tmp_path / d, calib, *flags, *extra), capsys)
        assert code == 0, err
    files = {d: sorted(f.name for f in (tmp_path / d).iterdir()) for d in ("lazy", "whole")}
    assert files["lazy"] == files["whole"]
    for name in files["lazy"]:
        if name not in ("llmprune.json", "model.safetensors"):
            assert (tmp_path / "lazy" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    a, b = _tensors(tmp_path / "lazy"), _tensors(tmp_path / "whole")
    assert sum(k.endswith(".weight_zero_point") for k in a) == 14
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    lazy, whole = (json.loads((tmp_path / d / "llmprune.json").read_text())["checkpoint"] for d in ("lazy", "whole"))
    assert lazy["format"] == whole["format"] == "compressed-tensors" and lazy["dtype"] == whole["dtype"]
    assert lazy["bits_per_weight"] == whole["bits_per_weight"]
