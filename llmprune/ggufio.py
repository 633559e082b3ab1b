"""GGUF files, parsed once per run and read one tensor at a time.

transformers parses a GGUF file's metadata on every ``AutoConfig`` / ``AutoTokenizer`` / ``from_pretrained``
call (``load_gguf_checkpoint``: seconds each, four or five times per run), then dequantizes every tensor into
host memory at once. Here a file is parsed once (``GgufFile``, kept for the process per path, size and
mtime): its config, tokenizer metadata and tensor index (name -> offset, type, shape). transformers' own
config and tokenizer builders are served that one parse (``parsed_once``), and tensors are read from their
offsets with plain file reads (no memory map whose pages would count as resident), dequantized one at a
time by ``gguf.quants.dequantize`` and renamed / un-permuted as transformers' GGUF loader does (its name map
and tensor processor), so ``GgufTensors`` is a drop-in ``TensorReader`` for the lazy block loader.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from llmprune.errors import UsageError

log = logging.getLogger("llmprune")

# architectures whose transformers tensor processor maps one GGUF tensor to one HF tensor (renames, the
# llama q/k permutation, gemma's norm offset); the others (MoE expert stacking, split qkv) load whole
STREAMABLE_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor",
                         "NemotronTensorProcessor")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in the file, and how to read them."""

    offset: int
    nbytes: int
    ggml_type: int
    dims: tuple[int, ...]  # GGUF order (innermost first), as stored


class GgufFile:
    """One GGUF file's metadata (``parsed``: transformers' config and tokenizer dicts) and tensor index."""

    def __init__(self, path: Path):
        from gguf import GGUFReader
        from transformers import modeling_gguf_pytorch_utils as mg

        self.path = Path(path)
        reader = GGUFReader(str(self.path))  # the one parse of this file in the run
        self.index = {t.name: TensorEntry(int(t.data_offset), int(t.n_bytes), int(t.tensor_type),
                                          tuple(int(d) for d in t.shape)) for t in reader.tensors}
        self.arch = str(mg.read_field(reader, "general.architecture")[0])  # what transformers' processors key on
        with _reader_given(str(self.path), reader):  # transformers' own config/tokenizer parse, on our reader
            self.parsed = _original(mg)(str(self.path), return_tensors=False)
        del reader  # its memory map goes; tensors are read from their offsets

    @property
    def config_dict(self) -> dict:
        return copy.deepcopy(self.parsed["config"])

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32 (numpy, HF dimension order), read from its offset."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        e = self.index[name]
        with open(self.path, "rb") as f:
            f.seek(e.offset)
            buf = f.read(e.nbytes)
        if len(buf) != e.nbytes:
            raise UsageError(f"{self.path} is truncated (tensor {name}): re-download or re-create it")
        qtype = GGMLQuantizationType(e.ggml_type)
        shape = tuple(reversed(e.dims))
        plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.F64: np.float64}
        if qtype in plain:
            data = np.frombuffer(buf, dtype=plain[qtype]).reshape(shape)
        else:
            if qtype not in GGML_QUANT_SIZES:
                raise UsageError(f"{self.path}: tensor {name} has GGML type {qtype.name}, which gguf cannot read")
            data = np.frombuffer(buf, dtype=np.uint8).reshape(quant_shape_to_byte_shape(shape, qtype))
        return np.asarray(dequantize(data, qtype), dtype=np.float32)


_FILES: dict[tuple[str, int, int], GgufFile] = {}


def gguf_file(path: str | Path) -> GgufFile:
    """The parsed file at ``path``, parsed on first use (again only if the file changed)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILES:
        for old in [k for k in _FILES if k[0] == key[0]]:
            del _FILES[old]
        try:
            _FILES[key] = GgufFile(p)
        except UsageError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UsageError(f"cannot read GGUF file {p} ({first}): pass a llama.cpp .gguf model file") from None
    return _FILES[key]


def _original(mg):
    """transformers' load_gguf_checkpoint, not our memo of it (``parsed_once`` may be active)."""
    fn = mg.load_gguf_checkpoint
    return getattr(fn, "__wrapped__", fn)


@contextlib.contextmanager
def _reader_given(path: str, reader) -> Iterator[None]:
    """While active, ``gguf.GGUFReader(path)`` returns ``reader`` (transformers constructs its own)."""
    import gguf

    cls = gguf.GGUFReader

    def make(p, *args, **kwargs):
        return reader if str(Path(p).resolve()) == path else cls(p, *args, **kwargs)

    gguf.GGUFReader = make
    try:
        yield
    finally:
        gguf.GGUFReader = cls


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """While active, transformers' metadata-only ``load_gguf_checkpoint`` calls (AutoConfig, AutoTokenizer)
    are answered from ``gguf_file``'s one parse instead of parsing the file again."""
    from transformers import modeling_gguf_pytorch_utils as mg

    original = _original(mg)

    def load_gguf_checkpoint(path, return_tensors=False, *args, **kwargs):
        if return_tensors:
            return original(path, return_tensors, *args, **kwargs)
        return copy.deepcopy(gguf_file(path).parsed)

    load_gguf_checkpoint.__wrapped__ = original
    mg.load_gguf_checkpoint = load_gguf_checkpoint
    try:
        yield
    finally:
        mg.load_gguf_checkpoint = original


def config_of(path: str | Path):
    """The transformers config of a GGUF file (its metadata, as ``AutoConfig.from_pretrained`` builds it)."""
    from transformers import AutoConfig

    p = Path(path)
    with parsed_once():
        return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)


def tokenizer_of(path: str | Path):
    """The tokenizer a GGUF file carries, or None (then a run that needs data says to pass ``--tokenizer``)."""
    from transformers import AutoTokenizer

    p = Path(path)
    with parsed_once():
        try:
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except Exception:
            return None


def fill(model: nn.Module, tensors: GgufTensors, dtype: torch.dtype, progress: bool = True) -> None:
    """Read every tensor of ``tensors`` into ``model`` (built on the meta device), one at a time, in ``dtype``
    (a progress bar per tensor); the output embedding tied again. A parameter left on meta is an error."""
    from llmprune.progress import track

    keys = tensors.keys()
    for key in track(keys, len(keys), f"loading {tensors.file.path.name}", progress, unit="tensor"):
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        value = tensors.get(key).to(dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise UsageError(f"{left[0]} is missing from {tensors.file.path}: the GGUF file does not hold this model")


class GgufTensors:
    """A GGUF file's tensors under the model's (HF) names, dequantized on read: ``TensorReader``'s interface
    (keys, ``in``, get, nbytes, close), so ``lazy.BlockSource`` reads a GGUF block by block."""

    def __init__(self, path: Path, model: nn.Module):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self.file = gguf_file(path)
        self.directory = self.file.path  # named in messages
        processor_cls = TENSOR_PROCESSORS.get(self.file.arch, TensorProcessor)
        if processor_cls.__name__ not in STREAMABLE_PROCESSORS:
            raise UsageError(f"{path}: GGUF architecture {self.file.arch!r} is not streamed: load it whole")
        self.processor = processor_cls(config=self.file.config_dict)
        to_hf = get_gguf_hf_weights_map(model, self.processor)
        self.where = {to_hf[name]: name for name in self.file.index if name in to_hf}

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> Tensor:
        name = self.where[key]
        out = self.processor.process(weights=self.file.read(name), name=name, tensor_key_mapping={},
                                     parsed_parameters={})
        return torch.from_numpy(np.require(out.weights, requirements=["C", "W"]))  # a copy when read-only

    def nbytes(self, key: str) -> int:
        e = self.file.index[self.where[key]]
        return 4 * int(np.prod(e.dims))  # dequantized to float32

    def close(self) -> None:
        """Nothing is held open between reads."""

    def check(self) -> None:
        size = os.path.getsize(self.file.path)
        for name, e in self.file.index.items():
            if e.offset + e.nbytes > size:
                raise UsageError(f"{self.file.path} is truncated (tensor {name}): re-download or re-create it")


def streamable(path: str | Path) -> bool:
    """Whether the GGUF file's tensors map one to one onto the model's (then it streams block by block)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    cls = TENSOR_PROCESSORS.get(gguf_file(path).arch, TensorProcessor)
    return cls.__name__ in STREAMABLE_PROCESSORS
