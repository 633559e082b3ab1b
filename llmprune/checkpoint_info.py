"""``llmprune inspect``: what a checkpoint directory holds, per linear and in total, read from its files.

Works on every layout llmprune writes (dense, compressed-tensors pack-quantized, packed 2:4) and on plain
Hugging Face directories. Sparsity and pattern are measured from the weights themselves, so the per-layer
sparsities an ``--allocation owl|spdy`` run chose show up here as they are on disk.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from llmprune.checkpoint import Source, TensorReader, block_linears, is_packed, read_report
from llmprune.pattern import Pattern
from llmprune.solvers.masks import holds


def detect_pattern(W: Tensor) -> str:
    if not bool((W == 0).any()):
        return "dense"
    for p in (Pattern(2, 4), Pattern(4, 8)):
        if holds(W, p):
            return str(p)
    return "unstructured"


def inspect_dir(directory: Path) -> dict:
    """{"layers": [...], "total": {...}, "format": ..., "allocation": ...} for ``directory``."""
    from llmprune.pack import PACKED, read_manifest, unpack_layer

    directory = Path(directory)
    rows = []
    if is_packed(directory):
        manifest = read_manifest(directory)
        layout = f"packed {manifest['pattern']}"
        packed = TensorReader(directory, prefix=PACKED)
        dense = TensorReader(directory)
        from transformers import AutoConfig

        linears = block_linears(AutoConfig.from_pretrained(directory))
        for name in linears:
            info = manifest["layers"].get(name)
            if info is not None:
                W, params = unpack_layer(packed, name, info)
                keys = [k for k in packed.keys() if k.rsplit(".", 1)[0] == name]
                nbytes = sum(packed.nbytes(k) for k in keys)
                fmt = "2:4 packed" + (_qlabel(params.spec) if params else f" {info['dtype']}")
            elif f"{name}.weight" in dense:
                W, nbytes = dense.get(f"{name}.weight"), dense.nbytes(f"{name}.weight")
                fmt = f"dense {str(W.dtype).removeprefix('torch.')}"
            else:
                continue
            rows.append(_row(name, fmt, W, nbytes))
        files = list(directory.glob("*.safetensors"))
    else:
        source = Source(directory)
        layout = "compressed-tensors" if source.spec is not None else "dense"
        for name in block_linears(source.config):
            keys = [k for k in source.layer_keys(name) if k in source.reader]
            if not keys:
                continue
            W, params = source.weight(name)
            nbytes = sum(source.reader.nbytes(k) for k in keys if not k.endswith("weight_shape"))
            if source.spec is not None and f"{name}.weight_packed" in source.reader:
                fmt = "pack-quantized" + _qlabel(params.spec)
            else:
                fmt = f"dense {str(W.dtype).removeprefix('torch.')}" + (_qlabel(params.spec) if params else "")
            rows.append(_row(name, fmt, W, nbytes))
        files = [f for f in directory.glob("*.safetensors") if not f.name.startswith("llmprune")]
    numel = sum(r["numel"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    total = {"linears": len(rows), "sparsity": zeros / numel if numel else 0.0,
             "bytes": sum(r["bytes"] for r in rows), "fp16_bytes": 2 * numel,
             "checkpoint_bytes": sum(f.stat().st_size for f in files)}
    report = read_report(directory) or {}
    return {"directory": str(directory), "layout": layout, "layers": rows, "total": total,
            "allocation": (report.get("allocation") or {}).get("method")}


def _qlabel(spec) -> str:
    g = "" if spec.group_size == -1 else f" g{spec.group_size}"
    return f" int{spec.wbits}{g}{'' if spec.sym else ' asym'}"


def _row(name: str, fmt: str, W: Tensor, nbytes: int) -> dict:
    zeros = int((W == 0).sum())
    return {"name": name, "format": fmt, "pattern": detect_pattern(W), "numel": W.numel(), "zeros": zeros,
            "sparsity": zeros / W.numel(), "bits": 8 * nbytes / W.numel(), "bytes": nbytes,
            "fp16_bytes": 2 * W.numel()}


def format_table(info: dict) -> str:
    """The human-readable table ``llmprune inspect`` prints."""
    width = max([len(r["name"]) for r in info["layers"]] + [5])
    lines = [f"{info['directory']}: {info['layout']}"
             + (f", allocation {info['allocation']}" if info["allocation"] else ""),
             f"{'layer':<{width}}  {'format':<24}{'pattern':>13}{'sparsity':>10}{'bits/w':>8}"
             f"{'bytes':>13}{'vs fp16':>9}"]
    for r in info["layers"]:
        lines.append(f"{r['name']:<{width}}  {r['format']:<24}{r['pattern']:>13}{r['sparsity']:>10.2%}"
                     f"{r['bits']:>8.2f}{r['bytes']:>13,}{r['bytes'] / r['fp16_bytes']:>9.3f}")
    t = info["total"]
    ratio = t["bytes"] / t["fp16_bytes"] if t["fp16_bytes"] else 0.0
    lines.append(f"{'total (' + str(t['linears']) + ' linears)':<{width}}  {'':<24}{'':>13}{t['sparsity']:>10.2%}"
                 f"{8 * t['bytes'] / max(t['fp16_bytes'] / 2, 1):>8.2f}{t['bytes']:>13,}{ratio:>9.3f}")
    lines.append(f"checkpoint files: {t['checkpoint_bytes']:,} bytes")
    return "\n".join(lines)
