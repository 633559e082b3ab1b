"""The streaming safetensors writer: its files read back exactly with safetensors and transformers."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmprune.checkpoint import save_tensors


def test_save_tensors_round_trips_every_dtype_and_layout(tmp_path):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    tensors = {
        "w.bf16": torch.randn(7, 5, generator=g).bfloat16(),
        "w.f16": torch.randn(3, 4, generator=g).half(),
        "w.f32.transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "w.f64": torch.randn(3, generator=g).double(),
        "codes.i32": torch.randint(-2**31, 2**31 - 1, (9,), generator=g, dtype=torch.int32),
        "meta.u8": torch.randint(0, 256, (2, 3), generator=g, dtype=torch.uint8),
        "zero.i8": torch.randint(-128, 128, (5,), generator=g, dtype=torch.int8),
        "pos.i64": torch.arange(4),
        "mask.bool": torch.rand(11, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "x.safetensors"
    save_tensors(tensors, path, metadata={"format": "pt"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
