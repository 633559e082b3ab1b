"""CUDA paths checked on the CPU with stand-ins: what a CPU run never reaches, made to run here as far as it
can (meta tensors, a patched torch.cuda). What cannot be is listed in docs/cuda.md as unverified."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llmprune import hessian
from llmprune.errors import UsageError


def test_the_tensor_core_hessian_path_is_callable_on_this_torch(monkeypatch):
    """bf16 activations on CUDA multiply in 16 bits with fp32 accumulation (torch.mm(out_dtype=), torch >=
    2.8); meta tensors run the same call here. Older torch takes the upcast path instead of a TypeError."""
    x = torch.randn(64, 600, dtype=torch.bfloat16, device="meta")
    H = torch.zeros(600, 600, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert hessian.on_tensor_cores(x, "auto", torch.float32) is hessian.MM_OUT_DTYPE
    H2, n = hessian.hessian_update(H, 0, x)
    assert n == 64 and H2.shape == (600, 600) and H2.dtype == torch.float32
    monkeypatch.setattr(hessian, "MM_OUT_DTYPE", False)  # torch 2.6 / 2.7
    assert not hessian.on_tensor_cores(x, "auto", torch.float32)
    assert hessian.hessian_update(H, 0, x)[0].dtype == torch.float32


def _fake_cuda(monkeypatch, count: int = 2, current: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def test_cuda_without_an_index_is_bound_to_the_current_device(monkeypatch):
    """Worker threads (the sequential pass) and Triton launch on the *current* device, which is per thread:
    a bare "cuda" must name the caller's device, not default to cuda:0 in the other threads."""
    from llmprune.engine import bound, resolve_device

    _fake_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert bound("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="2 CUDA device"):
        resolve_device("cuda:5")


def test_free_device_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    from llmprune.engine import cuda_free

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 10 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 4 << 30)
    assert cuda_free(torch.device("cuda", 0)) == 7 << 30


def test_kernels_launch_under_their_tensors_device(monkeypatch):
    from llmprune.kernels import launching_on

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    with launching_on(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        pass
    with launching_on(torch.zeros(1)):  # CPU (the interpreter): nothing to select
        pass
    assert entered == [torch.device("cuda", 1)]


def test_out_of_memory_is_not_taken_for_a_kernel_failure(monkeypatch):
    import llmprune.kernels as k

    k.reset()
    with pytest.raises(torch.OutOfMemoryError):
        k.fall_back("obs_update", "auto", "cuda:0", torch.OutOfMemoryError("CUDA out of memory"))
    assert not k.failed("obs_update")


class _Subclass(torch.Tensor):
    """Stands in for SparseSemiStructuredTensor: a weight that is not a plain tensor."""


def test_the_engine_refuses_weights_it_cannot_move(tiny_tokenizer):
    from conftest import tiny_model

    from llmprune.engine import Stream

    model = tiny_model("llama")
    lin = model.model.layers[0].mlp.down_proj
    lin.weight = nn.Parameter(torch.Tensor._make_subclass(_Subclass, lin.weight.data))
    with pytest.raises(UsageError, match="down_proj.weight is a _Subclass"):
        Stream(model, [torch.zeros(1, 4, dtype=torch.long)], "cpu")


def test_pack_and_unpack_take_a_device(tmp_path):
    from llmprune import api

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            api.pack(tmp_path / "m", tmp_path / "o", device="cuda")
    assert not (tmp_path / "o").exists()
