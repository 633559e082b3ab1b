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
from pathlib import Path

import torch
from torch import Tensor, nn

from llmprune import hostmem
from llmprune.arch import find_blocks
from llmprune.checkpoint import TensorReader
from llmprune.errors import UsageError
from llmprune.loading import DTYPES, load_tokenizer


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
    """Reads block ``i``'s tensors from ``reader`` (or from an override, e.g. an already compressed block)."""

    def __init__(self, reader: TensorReader, path: str, dtype: torch.dtype, rest: list[str]):
        self.reader = reader
        self.path = path
        self.dtype = dtype
        self.rest = rest  # checkpoint keys outside the blocks (a tied output embedding is not stored)
        self.overrides: dict[int, TensorReader] = {}

    def _read(self, reader: TensorReader, key: str) -> Tensor:
        t = reader.get(key)
        return t.to(self.dtype) if t.is_floating_point() else t

    def keys(self, i: int, block: nn.Module) -> dict[str, str]:
        """Block-local name -> checkpoint key, for every parameter and persistent buffer."""
        return {name: f"{self.path}.{i}.{name}" for name in block.state_dict()}

    def load(self, i: int, block: nn.Module) -> None:
        reader = self.overrides.get(i, self.reader)
        for name, key in self.keys(i, block).items():
            if key not in reader:
                raise UsageError(f"{key} is missing from {reader.directory}: the checkpoint does not match its"
                                 " config; re-save it with save_pretrained")
            _set_tensor(block, name, self._read(reader, key))
        reader.close()

    def release(self, i: int, block: nn.Module) -> None:
        _to_meta(block, block.state_dict())

    def rest_state(self) -> dict[str, Tensor]:
        """The tensors outside the blocks, read now, as the checkpoint stores them."""
        out = {key: self._read(self.reader, key) for key in self.rest}
        self.reader.close()
        return out

    def load_rest(self, model: nn.Module) -> None:
        for key, t in self.rest_state().items():
            _set_tensor(model, key, t)
        model.tie_weights()

    def release_rest(self, model: nn.Module) -> None:
        inside = f"{self.path}."
        _to_meta(model, {name: t for name, t in model.state_dict().items() if not name.startswith(inside)})


def load_lazy(directory: Path, dtype: str = "auto", trust_remote_code: bool = False):
    """(model with every parameter on the meta device and ``model.block_source`` set, tokenizer)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    hostmem.map_large_allocations()
    reader = TensorReader(directory)
    reader.check()
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    torch_dtype = DTYPES.get(dtype) or _stored_dtype(config, reader)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    path, blocks = find_blocks(model)
    inside = f"{path}."
    tied = _tied_keys(model)  # the output embedding, tied to the input embedding: stored once
    rest = [name for name in model.state_dict() if not name.startswith(inside) and name not in tied]
    for name in rest:
        if name not in reader:
            raise UsageError(f"{name} is missing from {directory}: the checkpoint does not match its config")
    model.block_source = BlockSource(reader, path, torch_dtype, rest)
    for i, block in enumerate(blocks):  # check the keys up front, not at block 57
        missing = [k for k in model.block_source.keys(i, block).values() if k not in reader]
        if missing:
            raise UsageError(f"{missing[0]} is missing from {directory}: the checkpoint does not match its config")
    return model, load_tokenizer(str(directory))


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
