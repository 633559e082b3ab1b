"""Writing a tiny llama as a GGUF file (as llama.cpp's converter lays it out), for the GGUF loader's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of transformers' reverse_permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model: nn.Module, path: Path, qtype: str = "F32") -> Path:
    """``model`` (a transformers llama) as a GGUF file; ``qtype``: F32, F16 or Q8_0 for the 2-D weights."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(c.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, _, suffix = key.rpartition(".")
        arr = t.detach().float().numpy()
        if ".q_proj." in key:
            arr = _permute(arr, c.num_attention_heads)
        elif ".k_proj." in key:
            arr = _permute(arr, c.num_key_value_heads)
        name = f"{names.get_name(base)}.{suffix}"
        kind = getattr(gguf.GGMLQuantizationType, qtype) if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
