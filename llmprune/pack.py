"""Packed 2:4 checkpoints: ``llmprune pack`` writes them, ``load``/``unpack`` read them back exactly.

A packed directory is a Hugging Face model directory whose ``model*.safetensors`` hold every tensor except
the packed linears' weights (embeddings, norms, biases, head, layers kept dense), plus
``packed24*.safetensors`` with, per packed linear ``NAME`` (weight as (out, in)):

- ``NAME.meta``   uint8 (out, ceil(in/8)): 2-bit positions of the 2 kept weights of every 4 (llmprune/kernels/pack24.py)
- ``NAME.values`` (out, in/2) in the model dtype, or, for a quantized layer,
  ``NAME.codes`` int32 (out, ceil(in/2 · bits/32)): the kept weights' integer codes, densely bit-packed,
  ``NAME.scale`` (out, groups) and, asymmetric only, ``NAME.zero`` uint8 (out, groups); a group of ``g``
  input columns holds ``g/2`` kept weights.

``llmprune-pack.json`` (the manifest) names the format, its version, and every packed layer.
Sizes: 2:4 in fp16 is 0.5625 of dense fp16; 2:4 + int4 with 16-bit scales per 128 columns is 0.195.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune import kernels as kernel_log
from llmprune.arch import causal_lm_class
from llmprune.bitpack import pack_int32, unpack_int32
from llmprune.checkpoint import (
    GRIDS,
    MANIFEST,
    REPORT,
    Source,
    TensorReader,
    block_linears,
    read_report,
    write_grids,
    write_shards,
)
from llmprune.errors import UsageError
from llmprune.kernels import dispatch
from llmprune.keymap import KeyMap
from llmprune.pattern import Pattern, parse_pattern
from llmprune.progress import Progress, track
from llmprune.quant import QuantParams, QuantSpec, dequantize, quantize, sym_zero

FORMAT = "llmprune-packed-2:4"
VERSION = 1
PACKED = "packed24"  # file prefix of the packed tensors; transformers reads only model*.safetensors


log = logging.getLogger(__name__)


def _pack24(W: Tensor, kernels: str) -> tuple[Tensor, Tensor]:
    from llmprune.kernels import pack24

    pack24.check24(W)  # a matrix that is not 2:4 is the input's fault, not the kernel's: never a fallback
    return dispatch("pack24", kernels, W.device, lambda: pack24.pack24(W), lambda: pack24.pack24_torch(W))


def _unpack24(values: Tensor, meta: Tensor, cols: int, kernels: str) -> Tensor:
    from llmprune.kernels import pack24

    return dispatch("unpack24", kernels, values.device, lambda: pack24.unpack24(values, meta, cols),
                    lambda: pack24.unpack24_torch(values, meta, cols))


def kept_grid(params: QuantParams, cols: int) -> tuple[Tensor, Tensor]:
    """scale and zero (float32) of the kept weights' columns: a group of g inputs keeps g/2 of them."""
    g = params.spec.group_cols(cols) // 2
    return params.scale.float().repeat_interleave(g, 1), params.zero.float().repeat_interleave(g, 1)


def pack_layer(name: str, W: Tensor, params: QuantParams | None, kernels: str) -> dict[str, Tensor]:
    """The packed tensors of one 2:4 linear (W as (out, in)); quantized layers as codes on their grid."""
    values, meta = _pack24(W, kernels)
    out = {f"{name}.meta": meta.cpu()}
    if params is None:
        out[f"{name}.values"] = values.cpu()
        return out
    if params.spec.is_float:
        raise UsageError(f"{name}: its {params.spec.grid} grid has float codes, which the packed 2:4 format does not"
                         " store: use the compressed-tensors checkpoint as it is")
    if params.spec.group_cols(W.shape[1]) % 4:
        raise UsageError(f"{name}: quantization groups of {params.spec.group_size} columns are not a multiple of"
                         " 4, so its 2:4 groups cannot keep their scales: pack without quantization")
    scale, zero = kept_grid(params, W.shape[1])
    scale, zero = scale.to(values.device), zero.to(values.device)
    c = quantize(values.float(), scale, zero, params.spec)
    if not torch.equal(dequantize(c, scale, zero).to(W.dtype), values):
        raise UsageError(f"{name}: weights are not on their quantization grid; re-run `llmprune compress`")
    out[f"{name}.codes"] = pack_int32(c.to(torch.uint8), params.spec.wbits).cpu()
    out[f"{name}.scale"] = params.scale.cpu().contiguous()
    if not params.spec.sym:
        out[f"{name}.zero"] = params.zero.cpu().contiguous()
    return out


def unpack_layer(reader: TensorReader, name: str, info: dict, kernels: str = "auto",
                 device: str | torch.device = "cpu") -> tuple[Tensor, QuantParams | None]:
    """(dense W as (out, in), grid or None) of one packed layer."""
    rows, cols = info["shape"]
    meta = reader.get(f"{name}.meta").to(device)
    params = None
    if info.get("wbits"):
        spec = QuantSpec(info["wbits"], info["group_size"], info["sym"], info.get("search", "minmax"))
        scale = reader.get(f"{name}.scale")
        zero = sym_zero(scale, spec) if spec.sym else reader.get(f"{name}.zero")
        params = QuantParams(scale, zero, spec)
        s, z = kept_grid(params, cols)
        c = unpack_int32(reader.get(f"{name}.codes").to(device), spec.wbits, cols // 2)
        values = dequantize(c.float(), s.to(device), z.to(device)).to(scale.dtype)
    else:
        values = reader.get(f"{name}.values").to(device)
    return _unpack24(values, meta, cols, kernels), params


def pack_checkpoint(src: Path, out: Path, pattern: str, skip_nonconforming: bool = False,
                    kernels: str = "auto", device: str = "cpu", progress: Progress = True) -> dict:
    """Write ``src`` packed into ``out`` (a directory being built; the caller publishes it atomically).

    Returns the manifest. Layers that are not 2:4 are refused (UsageError naming the layer and row) unless
    ``skip_nonconforming`` keeps them dense and lists them.
    """
    pat = parse_pattern(pattern)
    if pat not in (Pattern(2, 4), Pattern(4, 8)):
        raise UsageError(f"--pattern {pattern}: packing stores 2:4 (and 4:8 layers that are also 2:4); use 2:4")
    source = Source(src)
    kernel_log.reset()
    linears = block_linears(source.config)
    dense_keys = set(source.reader.keys())
    packed: dict[str, Tensor] = {}
    layers, kept_dense = {}, []
    total = {"packed_bytes": 0, "dense_fp16_bytes": 0}
    from llmprune.kernels.pack24 import check24

    for name, transposed in track(linears.items(), len(linears), "pack", progress, unit="layer"):
        if not source.layer_keys(name) & dense_keys:
            continue  # not stored under its module name
        W, params = source.weight(name)
        W = (W.t() if transposed else W).to(device)
        try:
            check24(W, name)
        except ValueError as exc:
            if skip_nonconforming:
                kept_dense.append(name)
                continue
            extra = " (it holds 4:8, but the packed format stores 2:4 only)" if pat.m == 8 else ""
            raise UsageError(f"{exc}{extra}: prune it 2:4, or pass --skip-nonconforming to keep it dense") from None
        if params is not None:
            params = params.to(device)
        tensors = pack_layer(name, W, params, kernels)
        packed.update(tensors)
        dense_keys -= source.layer_keys(name)
        layers[name] = {"shape": list(W.shape), "dtype": str(W.dtype).removeprefix("torch."),
                        "transposed": transposed, "wbits": params.spec.wbits if params else None,
                        "group_size": params.spec.group_size if params else None,
                        "sym": params.spec.sym if params else None,
                        "search": params.spec.search if params else None}
        total["packed_bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
        total["dense_fp16_bytes"] += 2 * W.numel()
    if not layers:
        raise UsageError(f"no linear of {src} holds 2:4: compress it with --pattern 2:4 first")

    dense: dict[str, Tensor] = {}
    for key in sorted(dense_keys):
        dense[key] = source.reader.get(key)
    experts = sorted(k for k in dense if ".experts." in k and dense[k].dim() >= 2)
    if experts:  # MoE expert weights are not nn.Linear modules: they stay dense, said, not hidden
        log.warning("%d mixture-of-experts tensors (e.g. %s) are stored dense: packing covers nn.Linear layers"
                    " only", len(experts), experts[0])
    # layers kept dense in a compressed-tensors source: store them dequantized, as plain weights
    for name in kept_dense:
        if f"{name}.weight" not in dense:
            W, _ = source.weight(name)
            dense[f"{name}.weight"] = W
            for k in source.layer_keys(name):
                dense.pop(k, None)
    out.mkdir(parents=True, exist_ok=True)
    write_shards(dense, out)
    write_shards(packed, out, prefix=PACKED)
    for f in src.iterdir():  # tokenizer, generation config, ...
        if f.is_file() and not f.name.startswith(("model", GRIDS, "config.json", REPORT)):
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(source.raw_config, indent=2) + "\n")
    manifest = {"format": FORMAT, "version": VERSION, "pattern": "2:4", "requested_pattern": str(pat),
                "layers": layers, "dense_layers": kept_dense, "dense_expert_tensors": experts, **total,
                "kernels_used": kernel_log.summary(), "kernel_fallbacks": kernel_log.failures()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    report = dict(source.report)
    report["pack"] = {k: v for k, v in manifest.items() if k != "layers"}
    (out / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict:
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise UsageError(f"{directory}: packed format {manifest.get('format')} v{manifest.get('version')} is not"
                         f" readable by this llmprune ({FORMAT} v{VERSION}): upgrade llmprune")
    return manifest


def unpacked_state(directory: Path, kernels: str = "auto", device: str = "cpu"):
    """(state dict with every packed weight dense again, in the file orientation; grids of quantized layers)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    dense = TensorReader(directory)
    state = {k: dense.get(k) for k in dense.keys()}
    reader = TensorReader(directory, prefix=PACKED)
    grids = {}
    for name, info in manifest["layers"].items():
        W, params = unpack_layer(reader, name, info, kernels, device)
        state[f"{name}.weight"] = (W.t() if info["transposed"] else W).cpu().contiguous()
        if params is not None:
            grids[name] = params
    return state, grids


def load(directory: str | Path, device: str = "cpu", dtype: str = "auto", semi_structured: bool = False,
         kernels: str = "auto"):
    """(model, tokenizer or None) from a packed directory (``llmprune.load`` reads every other kind).

    Packed weights are unpacked exactly. ``semi_structured=True`` (CUDA, compute capability >= 8.0) turns
    every packed fp16/bf16 nn.Linear into PyTorch's semi-structured sparse weight, so matmuls run on the
    sparse tensor cores; quantized layers stay dense (dequantized).
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.initialization import no_init_weights

    from llmprune.loading import DTYPES

    directory = Path(directory)
    if semi_structured:
        check_semi_structured(device)
    manifest = read_manifest(directory)
    config = AutoConfig.from_pretrained(directory)
    state, _ = unpacked_state(directory, kernels)
    with no_init_weights():
        model = causal_lm_class(config).from_config(config, dtype=_float_dtype(state))
    keymap = KeyMap(model, state)  # checkpoint keys -> parameters (per-expert tensors into fused ones)
    used = {k for n in keymap.sources for k in keymap.checkpoint_keys(n)}
    unexpected = sorted(set(state) - used)
    state = keymap.read(state.__getitem__, [n for n in model.state_dict() if n in keymap])
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    embed = model.get_input_embeddings()
    untied = [k for k in result.missing_keys if embed is None or model.get_parameter(k) is not embed.weight]
    if untied or unexpected:
        raise UsageError(f"{directory}: the packed checkpoint does not match its config (missing {untied[:3]},"
                         f" unexpected {unexpected[:3]}): re-pack it")
    model.eval()
    model.config.use_cache = False
    if dtype != "auto":
        model.to(DTYPES[dtype])
    model.to(device)
    if semi_structured:
        to_semi_structured(model, manifest)
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except Exception:  # a packed directory without tokenizer files is still a model
        tok = None
    return model, tok


def _float_dtype(state: dict[str, Tensor]) -> torch.dtype:
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def unpack_checkpoint(src: Path, out: Path, kernels: str = "auto", device: str = "cpu") -> None:
    """Write the packed ``src`` as a dense model directory (grids kept beside it, so it can be re-packed)."""
    state, grids = unpacked_state(src, kernels, device)
    out.mkdir(parents=True, exist_ok=True)
    write_shards(state, out)
    if grids:
        write_grids(out, grids)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.startswith(("model", PACKED, MANIFEST, REPORT)):
            shutil.copy2(f, out / f.name)
    report = read_report(src) or {}
    report.pop("pack", None)
    (out / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")


def check_semi_structured(device: str) -> None:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise UsageError("semi-structured sparse kernels need a CUDA GPU: load with device='cuda', or without"
                         " semi_structured")
    major, _ = torch.cuda.get_device_capability(dev)
    if major < 8:
        raise UsageError(f"semi-structured sparse kernels need compute capability >= 8.0 (this GPU: {major}.x):"
                         " load without semi_structured")


def to_semi_structured(model: nn.Module, manifest: dict) -> list[str]:
    """Swap each packed, unquantized fp16/bf16 nn.Linear weight for a semi-structured sparse tensor."""
    from torch.sparse import to_sparse_semi_structured

    done = []
    modules = dict(model.named_modules())
    for name, info in manifest["layers"].items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear) or info.get("wbits") or mod.weight.dtype not in (
                torch.float16, torch.bfloat16):
            continue
        mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.data), requires_grad=False)
        done.append(name)
    return done
