"""Writing checkpoints: a Hugging Face model directory plus ``llmprune.json``, published atomically.

Two layouts: ``dense`` (``save_hf``: every weight in the model dtype, quantized ones dequantized) and
``compressed-tensors`` (``save_compressed_tensors``: quantized linears as pack-quantized integer codes with
per-group scales, which transformers and vLLM load; pruned weights are code ``zero``, i.e. exactly 0).

Everything is written to a hidden sibling directory first and renamed into place only when complete, so a
crash or Ctrl-C never leaves a half-written ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from llmprune.bitpack import pack_int32
from llmprune.quant import QuantParams, QuantSpec, codes, dequantize

REPORT = "llmprune.json"


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_hf(model: nn.Module, tokenizer, directory: Path, report: dict, max_shard_size: str = "2GB") -> None:
    """Sharded safetensors, config, generation config, tokenizer, and the run report."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_report(directory, report)


def write_report(directory: Path, report: dict) -> None:
    (directory / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")


def read_report(directory: Path) -> dict | None:
    path = Path(directory) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def write_shards(tensors: dict[str, Tensor], directory: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Safetensors shards named as transformers names them, plus the index when there are several."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().cpu().contiguous()
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with tied tensors (lm_head = embed_tokens) kept once, under their first name; the
    loader ties them again from the config."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def pack_quantized(name: str, W: Tensor, params: QuantParams) -> dict[str, Tensor]:
    """One linear in compressed-tensors' pack-quantized layout (codes offset-binary, packed along inputs)."""
    spec = params.spec
    c = codes(W, params)
    scale, zero = params.columns(W.shape[1])
    if not torch.equal(dequantize(c.float(), scale, zero).to(W.dtype), W):
        raise RuntimeError(f"{name}: weights are not on their quantization grid; cannot store integer codes")
    out = {
        f"{name}.weight_packed": pack_int32(c, spec.wbits),
        f"{name}.weight_scale": params.scale.to(W.dtype),  # (rows, groups): dequantized = (c - zero) * scale
        f"{name}.weight_shape": torch.tensor(list(W.shape), dtype=torch.int64),
    }
    if not spec.sym:  # packed along the output dimension
        out[f"{name}.weight_zero_point"] = pack_int32(params.zero.t().contiguous(), spec.wbits).t().contiguous()
    return out


def compressed_tensors_config(spec: QuantSpec, act_order: bool, ignore: list[str]) -> dict:
    """The ``quantization_config`` transformers and vLLM read to rebuild pack-quantized linears."""
    weights = {
        "num_bits": spec.wbits,
        "type": "int",
        "symmetric": spec.sym,
        "strategy": "channel" if spec.group_size == -1 else "group",
        "group_size": None if spec.group_size == -1 else spec.group_size,
        "dynamic": False,
        "actorder": "weight" if act_order else None,  # static groups: same layout as without act-order
        "observer": "mse" if spec.search == "mse" else "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                        "output_activations": None, "format": "pack-quantized"},
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def save_compressed_tensors(
    model: nn.Module, tokenizer, directory: Path, report: dict, grids: dict[str, QuantParams],
    act_order: bool = False, max_shard_bytes: int = 2 * 1024**3,
) -> dict:
    """A model directory whose quantized linears are pack-quantized ints; every other linear (lm_head,
    skipped ones) is listed in ``ignore`` and stays dense. Returns size figures for the report."""
    if not grids:
        raise ValueError("no quantized layers to store as compressed-tensors")
    tensors = unique_state_dict(model)
    numel = packed_bytes = 0
    for name, params in grids.items():
        W = tensors.pop(f"{name}.weight")
        layer = pack_quantized(name, W, params)
        tensors.update(layer)
        numel += W.numel()
        packed_bytes += sum(t.numel() * t.element_size() for k, t in layer.items() if not k.endswith("shape"))
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in grids)
    write_shards(tensors, directory, max_shard_bytes)
    total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    spec = next(iter(grids.values())).spec
    model.config.save_pretrained(directory)
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = compressed_tensors_config(spec, act_order, ignore)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_report(directory, report)
    return {"format": "compressed-tensors", "bits_per_weight": 8 * packed_bytes / numel, "bytes": total}
