"""Writing checkpoints: a Hugging Face model directory plus ``llmprune.json``, published atomically.

Two layouts: ``dense`` (``save_hf``: every weight in the model dtype, quantized ones dequantized) and
``compressed-tensors`` (``save_compressed_tensors``: quantized linears as pack-quantized integer codes with
per-group scales, which transformers and vLLM load; pruned weights are code ``zero``, i.e. exactly 0). A
streamed run writes the same layout block by block through the same ``PackQuantizedWriter``.

Everything is written to a hidden sibling directory first and renamed into place only when complete, so a
crash or Ctrl-C never leaves a half-written ``--out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from llmprune.arch import causal_lm_class, find_blocks, find_linears
from llmprune.bitpack import pack_int32, unpack_int32
from llmprune.errors import UsageError
from llmprune.quant import E2M1, QuantParams, QuantSpec, codes, dequantize, sym_zero
from llmprune.schemes import ActSpec

REPORT = "llmprune.json"
GRIDS = "llmprune-grids.safetensors"  # dense checkpoints of quantized runs: each layer's scales and zero points
MANIFEST = "llmprune-pack.json"  # a packed 2:4 directory's manifest (pack.py)


@dataclass(frozen=True)
class OutputSpec:
    """How a compressed model is written."""

    format: str = "dense"  # dense (weights in the model dtype) or compressed-tensors (pack-quantized ints)
    act_order: bool = False  # the grids were chosen in act-order (compressed-tensors records it)
    activations: ActSpec | None = None  # the input activations' quantization the config declares

    @property
    def compressed_tensors(self) -> bool:
        return self.format == "compressed-tensors"


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
        follow_umask(tmp)
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


def umask() -> int:
    """The process's umask, read from /proc where it is there (setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: Path) -> None:
    """Give every file in ``directory`` the mode a new file gets (0666 less the umask): safetensors (so
    transformers' ``save_pretrained``) writes its weights through a private temporary file, mode 0600, while
    every other file of the output is written plainly."""
    mode = 0o666 & ~umask()
    for f in Path(directory).rglob("*"):
        if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o777 != mode:
            os.chmod(f, mode)


def save_hf(model: nn.Module, tokenizer, directory: Path, report: dict, max_shard_size: str = "2GB",
            grids: dict[str, QuantParams] | None = None) -> None:
    """Sharded safetensors, config, generation config, tokenizer, and the run report; with ``grids``
    also their scales and zero points (``GRIDS``), so ``llmprune pack`` can store integer codes later."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if grids:
        write_grids(directory, grids)
    write_report(directory, report)


def write_grids(directory: Path, grids: dict[str, QuantParams]) -> None:
    tensors = {}
    for name, p in grids.items():
        tensors[f"{name}.weight_scale"] = p.scale.contiguous()
        tensors[f"{name}.weight_zero_point"] = p.zero.contiguous()
        if p.global_scale is not None:
            tensors[f"{name}.weight_global_scale"] = p.global_scale.contiguous()
    spec = next(iter(grids.values())).spec
    meta = {"wbits": str(spec.wbits), "group_size": str(spec.group_size), "sym": str(spec.sym),
            "search": spec.search, "grid": spec.grid}
    widths = {name: p.spec.wbits for name, p in grids.items()}
    if len(set(widths.values())) > 1:  # mixed precision: each layer's bit-width (the rest is shared)
        meta["wbits_per_layer"] = json.dumps(widths)
    save_tensors(tensors, directory / GRIDS, metadata=meta)


def read_grids(directory: Path) -> dict[str, QuantParams]:
    """The grids ``write_grids`` stored (empty when the file is absent)."""
    path = Path(directory) / GRIDS
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        spec = QuantSpec(int(meta["wbits"]), int(meta["group_size"]), meta["sym"] == "True", meta["search"],
                         meta.get("grid", "int"))
        widths = json.loads(meta.get("wbits_per_layer", "{}"))
        keys = set(f.keys())
        names = sorted({k.rsplit(".", 1)[0] for k in keys})
        return {n: QuantParams(f.get_tensor(f"{n}.weight_scale"), f.get_tensor(f"{n}.weight_zero_point"),
                               dataclasses.replace(spec, wbits=int(widths[n])) if n in widths else spec,
                               f.get_tensor(f"{n}.weight_global_scale") if f"{n}.weight_global_scale" in keys else None)
                for n in names}


class TensorReader:
    """Tensors of a safetensors checkpoint (one file, or shards with an index), read one at a time.

    A damaged index, a shard it names that is not there, and a shard whose header does not match its bytes
    (offsets past the end or overlapping, a dtype whose size disagrees with its byte range: safetensors checks
    them when the file is opened) are each a UsageError naming the file.
    """

    def __init__(self, directory: Path, prefix: str = "model"):
        self.directory = Path(directory)
        self._files: dict[str, object] = {}
        self.index = self.directory / f"{prefix}.safetensors.index.json"
        single = self.directory / f"{prefix}.safetensors"
        if self.index.is_file():
            self.where = self._weight_map()
        elif single.is_file():
            self.where = dict.fromkeys(self._open(single.name).keys(), single.name)
        else:
            self.where = {}

    def _weight_map(self) -> dict[str, str]:
        try:
            where = json.loads(self.index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            where = None
        if not isinstance(where, dict) or not all(isinstance(f, str) for f in where.values()):
            raise UsageError(f"{self.index} is not a safetensors index (no weight_map of tensor names to files):"
                             " re-create it, or re-download the model")
        return where

    def _open(self, fname: str):
        if fname not in self._files:
            path = self.directory / fname
            if self.index.is_file() and not path.is_file():
                raise UsageError(f"{self.index.name} names {fname}, which is not in {self.directory}: the download"
                                 " or copy is incomplete; fetch the missing file")
            try:
                self._files[fname] = safe_open(str(path), "pt")
            except Exception as exc:
                why = str(exc).removeprefix("Error while deserializing header: ").splitlines()[0][:120]
                raise UsageError(f"cannot read {path} ({type(exc).__name__}: {why}): the file is truncated,"
                                 " damaged or not safetensors; re-create it") from None
        return self._files[fname]

    def check(self, float_weights: bool = False) -> None:
        """Open every shard now (headers and sizes are validated), so a truncated file fails before any work.
        ``float_weights`` (an unquantized checkpoint): a weight or bias stored as an integer type (the size of
        the float it should be, so safetensors cannot tell) is a damaged header too; read into a model it
        computes garbage, or fails mid-run."""
        for fname in sorted(set(self.where.values())):
            f = self._open(fname)
            for key in f.keys() if float_weights else ():
                dtype = f.get_slice(key).get_dtype()
                if key.endswith((".weight", ".bias")) and dtype.startswith(("I", "U", "BOOL")):
                    raise UsageError(f"{key} is stored as {dtype} in {self.directory / fname}, an integer type for a"
                                     " weight: its header is damaged; re-create it")

    def close(self) -> None:
        """Drop the open shards: their memory maps go, and with them the pages read (which count as RSS)."""
        self._files.clear()

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> Tensor:
        try:
            return self._open(self.where[key]).get_tensor(key)
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"cannot read tensor {key} from {self.directory / self.where[key]}"
                             f" ({type(exc).__name__}): the file is truncated or corrupt") from None

    def nbytes(self, key: str) -> int:
        sl = self._open(self.where[key]).get_slice(key)
        shape, dtype = sl.get_shape(), sl.get_dtype()
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
        n = 1
        for d in shape:
            n *= d
        return n * size.get(dtype, 4)


def decode_pack_quantized(reader: TensorReader, name: str, spec: QuantSpec) -> tuple[Tensor, QuantParams]:
    """One compressed-tensors pack-quantized linear back to (dense weight in the scale dtype, its grid)."""
    rows, cols = (int(v) for v in reader.get(f"{name}.weight_shape"))
    scale = reader.get(f"{name}.weight_scale")
    c = unpack_int32(reader.get(f"{name}.weight_packed"), spec.wbits, cols)
    if spec.sym:
        zero = sym_zero(scale, spec)
    else:
        zp = reader.get(f"{name}.weight_zero_point")  # packed along the output dimension
        zero = unpack_int32(zp.t().contiguous(), spec.wbits, rows).t().contiguous()
    params = QuantParams(scale, zero, spec)
    s, z = params.columns(cols)
    return dequantize(c.float(), s, z).to(scale.dtype), params


CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "nvfp4-pack-quantized",
              "mxfp4-pack-quantized")


def quant_spec_from_config(config: dict) -> QuantSpec | None:
    """The weights' QuantSpec of a compressed-tensors ``quantization_config`` (its first group's where it is
    mixed-precision: ``quant_groups`` gives each), in a format llmprune writes."""
    groups = quant_groups(config)
    return groups[0][1] if groups else None


def quant_groups(config: dict) -> list[tuple[list[str], QuantSpec, str]]:
    """The (targets, weights' QuantSpec, format) of each config group of a compressed-tensors
    ``quantization_config``: one group targeting every Linear, or (mixed-precision, as spdy over bit-widths
    writes it) one per grid targeting its linears by name. Empty: not quantized."""
    qc = config.get("quantization_config")
    if not qc:
        return []
    mixed = qc.get("format") == "mixed-precision"
    if qc.get("quant_method") != "compressed-tensors" or (qc.get("format") not in CT_FORMATS and not mixed):
        raise UsageError(f"unsupported quantization_config ({qc.get('quant_method')}/{qc.get('format')}):"
                         f" llmprune reads dense and compressed-tensors {', '.join(CT_FORMATS)} (or mixed-precision"
                         " of them) checkpoints")
    groups = list(qc["config_groups"].values())
    if len(groups) != 1 and not mixed:
        raise UsageError("unsupported compressed-tensors scheme: several weight groups outside mixed-precision")
    out = []
    for g in groups:
        fmt = g.get("format") or qc["format"]
        if fmt not in CT_FORMATS:
            raise UsageError(f"unsupported compressed-tensors group format {fmt!r}: llmprune reads"
                             f" {', '.join(CT_FORMATS)}")
        out.append((list(g.get("targets") or ["Linear"]), _weights_spec(g["weights"]), fmt))
    return out


def _weights_spec(w: dict) -> QuantSpec:
    """A config group's ``weights`` QuantizationArgs as a QuantSpec."""
    if w.get("type") not in ("int", "float"):
        raise UsageError("unsupported compressed-tensors scheme: int or float weights are supported")
    bits, group = int(w["num_bits"]), int(w["group_size"] or -1)
    grid = "int"
    if w["type"] == "float":
        grid = "fp8" if bits == 8 else {16: "nvfp4", 32: "mxfp4"}.get(group, "?")
        if grid == "?":
            raise UsageError(f"unsupported compressed-tensors float scheme ({bits} bits, group {group})")
    if w.get("strategy") == "tensor":
        group = 0
    return QuantSpec(bits, group, bool(w["symmetric"]), "mse" if w.get("observer") == "mse" else "minmax", grid)


def decode_layer(reader: TensorReader, name: str, spec: QuantSpec, fmt: str) -> tuple[Tensor, QuantParams]:
    """One compressed linear of any format ``pack_quantized`` writes back to (dense weight, its grid)."""
    if fmt == "pack-quantized":
        return decode_pack_quantized(reader, name, spec)
    scale = reader.get(f"{name}.weight_scale")
    gs = None
    if fmt in ("int-quantized", "naive-quantized", "float-quantized"):
        q = reader.get(f"{name}.weight")
        rows = q.shape[0]
        dtype = scale.dtype
        if spec.group_size == 0:
            scale = scale.reshape(1, 1).expand(rows, 1).contiguous()
        if spec.grid == "int":
            half = 2 ** (spec.wbits - 1)
            c = q.to(torch.int16) + half
            zero = (reader.get(f"{name}.weight_zero_point").to(torch.int16) + half).to(torch.uint8) if not spec.sym \
                else sym_zero(scale, spec)
        else:
            c, zero = q.float(), sym_zero(scale, spec)
    else:
        c = unpack_fp4(reader.get(f"{name}.weight_packed"))
        if spec.grid == "mxfp4":
            scale = torch.exp2(scale.float() - 127)
        else:
            gs = reader.get(f"{name}.weight_global_scale").float()
            scale = scale.float() / gs
        dtype = torch.bfloat16  # as compressed-tensors decompresses the FP4 formats
        zero = sym_zero(scale, spec)
    params = QuantParams(scale, zero, spec, gs)
    s, z = params.columns(c.shape[1])
    return dequantize(c.float(), s, z).to(dtype), params


def weights_bytes(directory: Path) -> int:
    """Bytes of the weight files a loader reads: those the index names, else ``model.safetensors`` (files still
    being replaced beside them, e.g. a streamed run's per-block files before they are removed, do not count),
    else every *.safetensors but the quantization grids kept beside dense weights (``GRIDS``, for ``pack``)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
        return sum((directory / f).stat().st_size for f in files)
    if (directory / "model.safetensors").is_file():
        return (directory / "model.safetensors").stat().st_size
    return sum(f.stat().st_size for f in directory.glob("*.safetensors") if f.name != GRIDS)


def save_metadata(model: nn.Module, tokenizer, directory: Path) -> None:
    """Everything of a model directory but the weights: config, generation config, tokenizer."""
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_report(directory: Path, report: dict) -> None:
    (directory / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")


def read_report(directory: Path) -> dict | None:
    path = Path(directory) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_tensors(tensors: Mapping[str, Tensor], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time, straight from each tensor's memory.

    ``safetensors.torch.save_file`` first turns every tensor into a bytes object, i.e. holds a second copy of
    everything it writes: a decoder block of a 175B model is 3.6 GB in fp16. This writer needs no extra host
    memory for CPU tensors (one tensor's worth for a device tensor), and its files load with safe_open.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_shards(tensors: dict[str, Tensor], directory: Path, max_shard_bytes: int = 2 * 1024**3,
                 prefix: str = "model") -> None:
    """Safetensors shards named as transformers names them, plus the index when there are several."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) == 1:
        save_tensors(shards[0], directory / f"{prefix}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _header(path: Path) -> tuple[dict, int]:
    """(a safetensors file's header, where its data starts)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def merge_files(directory: Path, sources: list[str], max_shard_bytes: int = 2 * 1024**3,
                prefix: str = "model") -> list[str]:
    """Concatenate safetensors files of ``directory`` into shards named as transformers names them (one
    ``{prefix}.safetensors`` when everything fits in ``max_shard_bytes``, else numbered shards and their index);
    return the shards' names. A streamed run writes one file per block, which would make a small model's
    output dozens of files. Bytes are copied file to file (no tensor is read into memory); a shard made of one
    file is a hard link to it. The sources stay (the caller removes them), so an interrupted merge can be redone.
    """
    directory = Path(directory)
    heads = [_header(directory / s) for s in sources]
    sizes = [(directory / s).stat().st_size - start for s, (_, start) in zip(sources, heads, strict=True)]
    groups: list[list[int]] = [[]]
    size = 0
    for i, nbytes in enumerate(sizes):
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    names = ([f"{prefix}.safetensors"] if len(groups) == 1 else
             [f"{prefix}-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)])
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups, strict=True):
        target = directory / name
        target.unlink(missing_ok=True)
        if len(group) == 1:
            with contextlib.suppress(OSError):  # a file system without hard links: copied below
                os.link(directory / sources[group[0]], target)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        base = 0
        for i in group:
            head = heads[i][0]
            for key, entry in sorted(((k, v) for k, v in head.items() if k != "__metadata__"),
                                     key=lambda kv: kv[1]["data_offsets"][0]):
                b, e = entry["data_offsets"]
                header[key] = {**entry, "data_offsets": [base + b, base + e]}
                weight_map[key] = name
            base += sizes[i]
        if target.exists():
            continue
        head_bytes = json.dumps(header, separators=(",", ":")).encode()
        head_bytes += b" " * (-len(head_bytes) % 8)
        with open(target, "wb") as out:
            out.write(struct.pack("<Q", len(head_bytes)))
            out.write(head_bytes)
            for i in group:
                with open(directory / sources[i], "rb") as src:
                    src.seek(heads[i][1])
                    shutil.copyfileobj(src, out, 16 << 20)
    index = directory / f"{prefix}.safetensors.index.json"
    index.unlink(missing_ok=True)
    if len(names) > 1:
        total = sum(sizes)
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                    indent=2) + "\n")
    return names


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


def ct_format(spec: QuantSpec, act: ActSpec | None = None) -> str:
    """The compressed-tensors format a scheme is written in, as compressed-tensors infers it
    (``compressors.format.infer_module_format``): integer weights with quantized activations as int8 tensors
    (int-quantized), without as packed int32 words (pack-quantized); FP8 as float8 tensors (float-quantized with
    quantized activations, naive-quantized without); the FP4 grids as two codes per byte."""
    if spec.grid in ("nvfp4", "mxfp4"):
        return f"{spec.grid}-pack-quantized"
    if spec.grid == "fp8":
        return "float-quantized" if act is not None else "naive-quantized"
    return "int-quantized" if act is not None else "pack-quantized"


def pack_fp4(values: Tensor) -> Tensor:
    """E2M1 code values (rows, cols) as compressed-tensors packs them: a code is the index of the magnitude
    (0, 0.5, ..., 6 -> 0..7) with the sign in bit 3, two per byte, the even column in the low nibble."""
    table = torch.tensor(E2M1, device=values.device)
    sign = torch.signbit(values).to(torch.uint8) << 3
    idx = torch.searchsorted(table, values.abs().contiguous()).to(torch.uint8) | sign
    idx = idx.reshape(values.shape[0], -1, 2)
    return (idx[..., 0] | (idx[..., 1] << 4)).contiguous()


def unpack_fp4(packed: Tensor) -> Tensor:
    """``pack_fp4``'s inverse: the code values as float32 (rows, 2 * bytes)."""
    table = torch.tensor(E2M1, device=packed.device)
    idx = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    return table[(idx & 7).long()] * torch.where((idx & 8).bool(), -1.0, 1.0)


def mx_exponents(scale: Tensor) -> Tensor:
    """Power-of-two scales as E8M0 (uint8 biased exponents, 2**(e - 127))."""
    return (127 + torch.log2(scale.float())).round().to(torch.uint8)


def pack_quantized(name: str, W: Tensor, params: QuantParams, act: ActSpec | None = None) -> dict[str, Tensor]:
    """One linear in its compressed-tensors layout (``ct_format``): pack-quantized (codes offset-binary, packed
    along inputs), int-quantized (signed int8 codes), naive/float-quantized (FP8 weights), nvfp4/mxfp4 (E2M1
    codes two per byte, FP8 or E8M0 scales, nvfp4's FP32 global scale). Scales are (rows, groups), (rows, 1)
    per channel, (1,) per tensor."""
    spec = params.spec
    c = codes(W, params)
    scale, zero = params.columns(W.shape[1])
    if not torch.equal(dequantize(c.float(), scale, zero).to(W.dtype), W):
        raise RuntimeError(f"{name}: weights are not on their quantization grid; cannot store integer codes")
    out = _pack_layer(name, W, params, c, ct_format(spec, act))
    return {k: v.contiguous() for k, v in out.items()}


def _pack_layer(name: str, W: Tensor, params: QuantParams, c: Tensor, fmt: str) -> dict[str, Tensor]:
    spec = params.spec
    s = params.scale[:1, :1].reshape(1) if spec.group_size == 0 else params.scale
    if fmt == "pack-quantized":
        out = {
            f"{name}.weight_packed": pack_int32(c, spec.wbits),
            f"{name}.weight_scale": params.scale.to(W.dtype),  # (rows, groups): dequantized = (c - zero) * scale
            f"{name}.weight_shape": torch.tensor(list(W.shape), dtype=torch.int64),
        }
        if not spec.sym:  # packed along the output dimension
            out[f"{name}.weight_zero_point"] = pack_int32(params.zero.t().contiguous(), spec.wbits).t().contiguous()
        return out
    if fmt == "int-quantized":
        half = 2 ** (spec.wbits - 1)
        out = {f"{name}.weight": (c.to(torch.int16) - half).to(torch.int8), f"{name}.weight_scale": s.to(W.dtype)}
        if not spec.sym:
            out[f"{name}.weight_zero_point"] = (params.zero.to(torch.int16) - half).to(torch.int8)
        return out
    if spec.grid == "fp8":
        return {f"{name}.weight": c.to(torch.float8_e4m3fn), f"{name}.weight_scale": s.to(W.dtype)}
    out = {f"{name}.weight_packed": pack_fp4(c)}
    if spec.grid == "mxfp4":
        out[f"{name}.weight_scale"] = mx_exponents(params.scale)
        return out
    gs = params.global_scale.float().reshape(1)
    local = (params.scale.float() * gs).to(torch.float8_e4m3fn)  # exact: the scale is fp8 / gs in fp32
    if not torch.equal(local.float() / gs, params.scale.float()):
        raise RuntimeError(f"{name}: nvfp4 scales are not FP8 values over the global scale")
    out[f"{name}.weight_scale"] = local
    out[f"{name}.weight_global_scale"] = gs
    return out


def weights_args(spec: QuantSpec, act_order: bool = False) -> dict:
    """The ``weights`` QuantizationArgs of a grid, as compressed-tensors serialises them."""
    strategy = {-1: "channel", 0: "tensor"}.get(spec.group_size, "group")
    if spec.grid == "nvfp4":
        strategy = "tensor_group"
    out = {
        "num_bits": spec.wbits,
        "type": "float" if spec.is_float else "int",
        "symmetric": spec.sym,
        "group_size": spec.group_size if spec.group_size > 0 else None,
        "strategy": strategy,
        "dynamic": False,
        "actorder": "weight" if act_order else None,  # static groups: same layout as without act-order
        "observer": "mse" if spec.search == "mse" else "minmax",
    }
    if spec.grid == "nvfp4":
        out["scale_dtype"] = "torch.float8_e4m3fn"
    elif spec.grid == "mxfp4":
        out["scale_dtype"] = "torch.uint8"
    return out


def compressed_tensors_config(specs: dict[QuantSpec, list[str]], act_order: bool, ignore: list[str],
                              act: ActSpec | None = None) -> dict:
    """The ``quantization_config`` transformers and vLLM read to rebuild the quantized linears (and, with
    ``act``, to quantize their inputs at run time). Never a ``sparsity_config``: runtimes dropped sparse formats.

    ``specs``: {grid: the linears on it}. One grid: one group targeting every ``Linear`` not ignored. Several
    (spdy over bit-widths): one config group per grid, targeting its linears by name, in compressed-tensors'
    ``mixed-precision`` format."""
    def group(s: QuantSpec, targets: list[str]) -> dict:
        return {"targets": targets, "weights": weights_args(s, act_order),
                "input_activations": act.config() if act is not None else None,
                "output_activations": None, "format": ct_format(s, act)}

    if len(specs) == 1:
        only = next(iter(specs))
        fmt, groups = ct_format(only, act), {"group_0": group(only, ["Linear"])}
    else:
        order = sorted(specs, key=lambda s: (s.wbits, s.grid, s.group_size))
        fmt = "mixed-precision"
        groups = {f"group_{i}": group(s, sorted(specs[s])) for i, s in enumerate(order)}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


class PackQuantizedWriter:
    """The one compressed-tensors writer, for both ways a run writes: an in-memory run packs every linear of
    its state dict at once (``save_compressed_tensors``), a streamed one each finished block's file as it is
    published. ``pack`` each quantized linear in the tensors to be written, then ``write_config`` once the
    directory holds the model's config, and ``info`` for the report. ``act``: the activations' quantization
    the scheme declares."""

    def __init__(self, act: ActSpec | None = None) -> None:
        self.numel = 0  # weights packed
        self.packed_bytes = 0  # of their codes, scales and zero points
        self.quantized: set[str] = set()  # module names
        self.specs: dict[QuantSpec, list[str]] = {}  # grid -> the modules on it (several: mixed precision)
        self.act = act

    def pack(self, tensors: dict[str, Tensor], key: str, module: str, params: QuantParams) -> None:
        """Replace ``tensors[key + ".weight"]`` (linear ``module``'s weight, stored as ``key``) by its
        compressed entries."""
        W = tensors.pop(f"{key}.weight")
        layer = pack_quantized(key, W, params, self.act)
        tensors.update(layer)
        self.numel += W.numel()
        self.packed_bytes += sum(t.numel() * t.element_size() for k, t in layer.items() if not k.endswith("shape"))
        self.quantized.add(module)
        self.specs.setdefault(params.spec, []).append(module)

    def write_config(self, model: nn.Module, directory: Path, act_order: bool) -> None:
        """Add the ``quantization_config`` to ``directory/config.json``: every linear not packed is in
        ``ignore`` and stays dense (lm_head, skipped ones)."""
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in self.quantized)
        cfg_path = directory / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = compressed_tensors_config(self.specs, act_order, ignore, self.act)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    def info(self, total_bytes: int, dtype: str | None = None) -> dict:
        """Size figures for the report (``dtype``: of the scales and dense tensors, where the caller has it)."""
        return {"format": "compressed-tensors", **({"dtype": dtype} if dtype is not None else {}),
                "bits_per_weight": 8 * self.packed_bytes / self.numel, "bytes": total_bytes}


def save_compressed_tensors(
    model: nn.Module, tokenizer, directory: Path, report: dict, grids: dict[str, QuantParams],
    act_order: bool = False, max_shard_bytes: int = 2 * 1024**3, act: ActSpec | None = None,
) -> dict:
    """A model directory whose quantized linears are pack-quantized ints; every other linear (lm_head,
    skipped ones) is listed in ``ignore`` and stays dense. Returns size figures for the report."""
    if not grids:
        raise ValueError("no quantized layers to store as compressed-tensors")
    tensors = unique_state_dict(model)
    writer = PackQuantizedWriter(act)
    for name, params in grids.items():
        writer.pack(tensors, name, name, params)
    write_shards(tensors, directory, max_shard_bytes)
    total = weights_bytes(directory)
    save_metadata(model, tokenizer, directory)
    writer.write_config(model, directory, act_order)
    write_report(directory, report)
    return writer.info(total)


def is_packed(directory: Path) -> bool:
    """Whether ``directory`` is a packed 2:4 checkpoint (``llmprune pack``)."""
    return (Path(directory) / MANIFEST).is_file()


def block_linears(config) -> dict[str, bool]:
    """Full name -> transposed (Conv1D stores (in, out)) of every linear inside a decoder block."""

    with torch.device("meta"):
        model = causal_lm_class(config).from_config(config)
    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": not isinstance(m, nn.Linear)
            for i, block in enumerate(blocks) for n, m in find_linears(block).items()}


class Source:
    """A dense or compressed-tensors (pack-quantized) checkpoint, read layer by layer as dense weights."""

    def __init__(self, directory: Path):
        from transformers import AutoConfig

        self.directory = Path(directory)
        if is_packed(self.directory):
            raise UsageError(f"{directory} is already packed: pass the compressed checkpoint it came from, or"
                             f" `llmprune unpack {directory}` first")
        raw = json.loads((self.directory / "config.json").read_text())
        self.groups = quant_groups(raw)
        self.spec = self.groups[0][1] if self.groups else None  # None: dense (with llmprune's grids file)
        self.format = (raw.get("quantization_config") or {}).get("format")
        self.raw_config = {k: v for k, v in raw.items() if k != "quantization_config"}
        self.config = AutoConfig.for_model(**self.raw_config)
        self.reader = TensorReader(self.directory)
        if not self.reader.keys():
            raise UsageError(f"{directory} holds no model.safetensors: pass a checkpoint written by"
                             " `llmprune compress` or save_pretrained")
        self.grids = read_grids(self.directory) if self.spec is None else {}
        report = read_report(self.directory) or {}
        if self.spec is None and not self.grids and (report.get("recipe") or {}).get("wbits"):
            raise UsageError(f"{directory} holds quantized weights without their grids ({GRIDS}): re-run"
                             " `llmprune compress` with this llmprune, or with --format compressed-tensors")
        self.report = report

    def weight(self, name: str) -> tuple[Tensor, QuantParams | None]:
        """(W as stored in the file's orientation, its grid or None)."""
        if self.spec is not None and f"{name}.weight_scale" in self.reader:
            return decode_layer(self.reader, name, *self.group_of(name))
        return self.reader.get(f"{name}.weight"), self.grids.get(name)

    def group_of(self, name: str) -> tuple[QuantSpec, str]:
        """The grid and format of compressed linear ``name``: its config group's (targets by name first,
        compressed-tensors' ``re:`` patterns, then the class ``Linear``)."""
        for targets, spec, fmt in self.groups:
            if name in targets:
                return spec, fmt
        for targets, spec, fmt in self.groups:
            if any(t.startswith("re:") and re.match(t[3:], name) for t in targets):
                return spec, fmt
        for targets, spec, fmt in self.groups:
            if "Linear" in targets:
                return spec, fmt
        raise UsageError(f"{self.directory}: no config group of its quantization_config targets {name}")

    def layer_keys(self, name: str) -> set[str]:
        """The checkpoint keys that make up ``name``'s weight."""
        if self.spec is not None and f"{name}.weight_scale" in self.reader:
            return {f"{name}.{s}" for s in ("weight", "weight_packed", "weight_scale", "weight_shape",
                                             "weight_zero_point", "weight_global_scale")}
        return {f"{name}.weight"}
