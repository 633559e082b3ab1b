"""Lazy loading: a model whose decoder blocks stay on disk until the engine reaches them.

The skeleton is built without weights (parameters on the meta device; buffers such as rotary tables are
computed as usual). Each block's tensors are read from the safetensors shards when its turn comes, then
dropped again; so are the tensors outside the blocks (embeddings, final norm, head), which the engine needs
only to capture the first block's inputs and to compute logits. Host memory is about one block, whatever
the model's size.

The engine calls ``BlockSource.load(i, block)`` / ``release(i, block)`` around each block, and
``load_rest(model)`` / ``release_rest(model)`` around its uses of the rest, when the model carries a
``block_source`` attribute; it knows nothing else about where weights come from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune import distributed, experts, hostmem
from llmprune.arch import causal_lm_class, find_blocks
from llmprune.checkpoint import TensorReader
from llmprune.errors import UsageError
from llmprune.keymap import KeyMap
from llmprune.loading import DTYPES, load_tokenizer, working_dtype


def can_load_lazily(directory: Path) -> bool:
    """A plain safetensors model directory (no quantization_config, not packed), single file or sharded."""
    directory = Path(directory)
    if not (directory / "config.json").is_file() or (directory / "llmprune-pack.json").is_file():
        return False
    if "quantization_config" in json.loads((directory / "config.json").read_text()):
        return False
    return (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _to_meta(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Drop ``tensors`` (names in ``module``) to the meta device, shapes and dtypes kept, and hand the freed
    memory back to the OS."""
    for name, t in tensors.items():
        _set_tensor(module, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
    hostmem.trim()


class BlockSource:
    """Reads block ``i``'s tensors from ``reader`` (or from an override, e.g. an already compressed block).

    ``keymap`` says which checkpoint keys make each parameter (keymap.py): per-expert checkpoint tensors are
    stacked into the fused parameters the model has, renamed keys found under their stored names.
    """

    def __init__(self, reader: TensorReader, path: str, dtype: torch.dtype, rest: list[str], keymap: KeyMap,
                 read_on_main: bool = False):
        self.reader = reader
        self.path = path
        self.dtype = dtype
        self.rest = rest  # parameter names outside the blocks (a tied output embedding is not stored)
        self.keymap = keymap
        self.overrides: dict[int, TensorReader] = {}
        # under torchrun: rank 0 reads each block and broadcasts it (True), or every rank reads the shards
        # itself (False, the default; needs the checkpoint on a file system every node sees)
        self.read_on_main = read_on_main

    def _read(self, reader: TensorReader, key: str) -> Tensor:
        t = reader.get(key)
        return t.to(self.dtype) if t.is_floating_point() else t

    def keys(self, i: int, block: nn.Module) -> list[str]:
        """The model's names of block ``i``'s parameters and persistent buffers."""
        return [f"{self.path}.{i}.{name}" for name in block.state_dict()]

    def _keymap(self, reader: TensorReader) -> KeyMap:
        """The input's key map; an override (a compressed block, which may hold fewer experts) gets its own."""
        return self.keymap if reader is self.reader else KeyMap(self.keymap.model, reader.keys())

    def missing(self, i: int, block: nn.Module, reader: TensorReader | None = None) -> list[str]:
        """Checkpoint keys block ``i`` needs that ``reader`` lacks (as named in the checkpoint)."""
        reader = reader or self.reader
        keymap = self._keymap(reader)
        out = []
        for name in self.keys(i, block):
            if name not in keymap:
                out.append(name)
            else:
                out += [k for k in keymap.checkpoint_keys(name) if k not in reader]
        return out

    def _fetch(self, read: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """``read()``'s tensors: read here, or (under torchrun with ``read_on_main``) read by rank 0 alone and
        broadcast to the others."""
        if not (self.read_on_main and distributed.active()):
            return read()
        return distributed.broadcast_tensors(read() if distributed.is_main() else None)

    def _read_block(self, i: int, block: nn.Module, reader: TensorReader) -> dict[str, Tensor]:
        missing = self.missing(i, block, reader)
        if missing:
            raise UsageError(f"{missing[0]} is missing from {reader.directory}: the checkpoint does not match its"
                             " config; re-save it with save_pretrained")
        state = block.state_dict()
        inside = f"{self.path}.{i}."
        out = {}
        for name, t in self._keymap(reader).read(lambda k: self._read(reader, k), self.keys(i, block)).items():
            local = name.removeprefix(inside)
            if reader is self.reader and local in state and tuple(state[local].shape) != tuple(t.shape):
                raise UsageError(f"{name} is stored as {tuple(t.shape)} in {reader.directory}, but its config makes"
                                 f" it {tuple(state[local].shape)}: the checkpoint does not match its config")
            out[local] = t
        reader.close()
        return out

    def load(self, i: int, block: nn.Module) -> None:
        reader = self.overrides.get(i, self.reader)
        for local, t in self._fetch(lambda: self._read_block(i, block, reader)).items():
            _set_tensor(block, local, t)
        if reader is not self.reader:  # a compressed block may have fewer experts than the skeleton
            experts.sync_counts(block)

    def original_tensors(self, i: int, block: nn.Module) -> dict[str, Tensor]:
        """Block ``i``'s tensors as the input checkpoint holds them (whatever override is set), by name in the
        block, on the CPU."""
        return self._fetch(lambda: self._read_block(i, block, self.reader))

    def release(self, i: int, block: nn.Module) -> None:
        _to_meta(block, block.state_dict())

    def checkpoint_tensors(self, i: int, block: nn.Module) -> dict[str, Tensor]:
        """Block ``i``'s tensors under the checkpoint's keys and in its layout (per-expert tensors split back
        out of fused parameters, as save_pretrained writes them)."""
        return self.keymap.to_checkpoint({f"{self.path}.{i}.{k}": v for k, v in block.state_dict().items()})

    def rest_state(self) -> dict[str, Tensor]:
        """The tensors outside the blocks, read now, as the checkpoint stores them (its keys)."""
        out = {key: self._read(self.reader, key) for name in self.rest for key in self.keymap.checkpoint_keys(name)}
        self.reader.close()
        return out

    def _read_rest(self) -> dict[str, Tensor]:
        out = self.keymap.read(lambda k: self._read(self.reader, k), self.rest)
        self.reader.close()
        return out

    def load_rest(self, model: nn.Module) -> None:
        for name, t in self._fetch(self._read_rest).items():
            _set_tensor(model, name, t)
        model.tie_weights()

    def release_rest(self, model: nn.Module) -> None:
        inside = f"{self.path}."
        _to_meta(model, {name: t for name, t in model.state_dict().items() if not name.startswith(inside)})


def load_lazy(directory: Path, dtype: str = "auto", trust_remote_code: bool = False, read_on_main: bool = False,
              fp32_to_bf16: bool = False):
    """(model with every parameter on the meta device and ``model.block_source`` set, tokenizer).
    ``read_on_main``: under torchrun, rank 0 reads the blocks and broadcasts them (``BlockSource``).
    ``fp32_to_bf16``: ``dtype`` auto reads float32 weights as bfloat16 (``loading.working_dtype``)."""
    from transformers import AutoConfig

    directory = Path(directory)
    hostmem.map_large_allocations()
    reader = TensorReader(directory)
    reader.check(float_weights=True)  # can_load_lazily: not quantized
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    torch_dtype = working_dtype(dtype, _stored_dtype(config, reader), fp32_to_bf16)
    model = _meta_model(config, torch_dtype, trust_remote_code)
    _attach(model, reader, torch_dtype, read_on_main, directory)
    return model, load_tokenizer(str(directory))


def load_lazy_gguf(path: Path, dtype: str = "auto", read_on_main: bool = False, fp32_to_bf16: bool = False):
    """``load_lazy`` for a .gguf file: its blocks read and dequantized one at a time (ggufio.GgufTensors), the
    file's metadata parsed once."""
    from llmprune import ggufio

    path = Path(path)
    hostmem.map_large_allocations()
    config = ggufio.config_of(path)
    torch_dtype = working_dtype(dtype, torch.float32, fp32_to_bf16)  # GGUF tensors dequantize to float32
    model = _meta_model(config, torch_dtype, False)
    reader = ggufio.GgufTensors(path, model)
    reader.check()
    _attach(model, reader, torch_dtype, read_on_main, path)
    return model, ggufio.tokenizer_of(path)


def _meta_model(config, torch_dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = causal_lm_class(config).from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    return model


def _attach(model: nn.Module, reader, torch_dtype: torch.dtype, read_on_main: bool, where: Path) -> None:
    """Set ``model.block_source``, every key it will need checked up front (not at block 57)."""
    path, blocks = find_blocks(model)
    inside = f"{path}."
    tied = _tied_keys(model)  # the output embedding, tied to the input embedding: stored once
    rest = [name for name in model.state_dict() if not name.startswith(inside) and name not in tied]
    keymap = KeyMap(model, reader.keys())
    for name in rest:
        if name not in keymap:
            raise UsageError(f"{name} is missing from {where}: the checkpoint does not match its config")
    model.block_source = BlockSource(reader, path, torch_dtype, rest, keymap, read_on_main)
    for i, block in enumerate(blocks):
        missing = model.block_source.missing(i, block)
        if missing:
            raise UsageError(f"{missing[0]} is missing from {where}: the checkpoint does not match its config")


def _tied_keys(model: nn.Module) -> set[str]:
    """The output embedding's weight key when the config ties it to the input embedding."""
    out = model.get_output_embeddings()
    if out is None or not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is out}


def _stored_dtype(config, reader: TensorReader) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    if isinstance(dt, str) and dt in DTYPES:
        return DTYPES[dt]
    for k in reader.keys():
        t = reader.get(k)
        if t.is_floating_point():
            return t.dtype
    return torch.float32
