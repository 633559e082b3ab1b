"""Multimodal checkpoints: the language model's blocks are compressed, never a vision tower's."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import llmprune
from llmprune.errors import UsageError

TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
              patch_size=14)


def _config(family: str):
    from transformers import Gemma3Config, LlavaConfig

    if family == "gemma3":
        return Gemma3Config(text_config=dict(TEXT, model_type="gemma3_text", sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"]),
                            vision_config=dict(VISION, model_type="siglip_vision_model"), mm_tokens_per_image=4)
    return LlavaConfig(text_config=dict(TEXT, model_type="llama"),
                       vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=32),
                       image_seq_length=4)


@pytest.fixture(scope="module", params=["gemma3", "llava"])
def mm_dir(request, tmp_path_factory, tiny_tokenizer):
    from llmprune.arch import causal_lm_class

    torch.manual_seed(0)
    config = _config(request.param)
    model = causal_lm_class(config).from_config(config).eval()
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _tensors(directory):
    out = {}
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("lazy", [True, False])
def test_only_the_language_models_blocks_are_compressed(mm_dir, tmp_path, lazy):
    report = llmprune.compress(mm_dir, tmp_path / "o", lazy=lazy, calib="shakespeare", nsamples=4, seqlen=32,
                               device="cpu", progress=False).to_dict()
    assert len(report["layers"]) == 2 * 7
    assert all("language_model" in r["name"] for r in report["layers"])
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    before, after = _tensors(mm_dir), _tensors(tmp_path / "o")
    assert before.keys() == after.keys()
    vision = [k for k in before if "vision" in k]
    # untouched, but written in bf16 like the rest of this fp32 model
    assert vision and all(after[k].dtype == torch.bfloat16 and torch.equal(before[k].to(torch.bfloat16), after[k])
                          for k in vision)
    model, _ = llmprune.load(tmp_path / "o")  # loads as the multimodal class, with its tower
    assert any("vision" in n for n, _ in model.named_parameters())


def test_a_model_without_decoder_blocks_is_a_one_line_error():
    from transformers import AutoConfig, AutoModel

    from llmprune.arch import find_blocks

    model = AutoModel.from_config(AutoConfig.for_model("clip_vision_model", **VISION))
    with pytest.raises(UsageError, match="cannot find the decoder blocks of this clip_vision_model"):
        find_blocks(model)
