"""The fused OBS block update (Triton, run on CPU by TRITON_INTERPRET=1) against its torch twin and against the
solver's torch loop: same masks, N:M patterns and codes, weights equal to fp32 rounding.

Shapes are small on purpose (the interpreter executes every program in Python) but awkward: rows not a
multiple of the 16-row tile, columns not a multiple of the block.
"""

from __future__ import annotations

import pytest
import torch

from llmprune.kernels import use_triton
from llmprune.kernels.obs_update import BlockState, obs_update, obs_update_torch
from llmprune.pattern import Pattern
from llmprune.quant import QuantSpec, codes, layer_params
from llmprune.solvers.hinv import inverse_hessian_cholesky
from llmprune.solvers.masks import holds, smallest_k_mask
from llmprune.solvers.sparsegpt import sparsegpt


def problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, 3 * cols, generator=g)
    X[: cols // 4] *= 3  # uneven input scales, as in real activations
    return torch.randn(rows, cols, generator=g), X @ X.T / X.shape[1]


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("quant", [False, True])
def test_kernel_block_equals_its_torch_twin_bit_for_bit(nm, quant):
    rows, count = 19, 24
    W, H = problem(rows, count, seed=1 + 3 * quant + (nm or (0, 0))[1])
    Hinv, _, _ = inverse_hessian_cholesky(H, 0.01)
    d = torch.diag(Hinv)
    mask = None if nm else smallest_k_mask((W**2 / d**2).t(), rows * count // 2).t()
    grid, H1 = None, Hinv
    if quant:
        p = layer_params(W, QuantSpec(3), torch.float32)
        S = p.scale.t().repeat(count, 1)  # (count, rows): per-channel grid on every column
        Z = p.zero.t().float().repeat(count, 1)
        grid, H1 = (S, -Z, 7 - Z), Hinv / d.unsqueeze(1)
    a, b = BlockState(W, mask), BlockState(W, mask)
    # two launches split at column 8, as the solver does where a quantization group starts
    for c0, c1 in ((0, 8), (8, count)):
        obs_update(a, H1, d, c0, c1, nm, grid)
        obs_update_torch(b, H1, d, c0, c1, nm, grid)
    for name in ("mask", "Q", "E", "W", "losses"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    if nm:
        assert holds(a.Q, Pattern(*nm)) and int((a.mask != 0).sum()) == rows * count * (nm[1] - nm[0]) // nm[1]


CASES = [  # (rows, cols, block_size, pattern, quant)
    (19, 72, 32, None, None),
    (21, 40, 16, Pattern(2, 4), None),
    (17, 48, 16, Pattern(4, 8), None),
    (19, 72, 32, None, QuantSpec(4)),
    (17, 64, 16, Pattern(2, 4), QuantSpec(4, 32)),  # group spans two blocks: grid chosen between launches
    (18, 64, 32, None, QuantSpec(3, 16, sym=False)),  # two groups inside each block
    (9, 256, 128, None, QuantSpec(4, 128)),
]


@pytest.mark.parametrize("rows,cols,block_size,pattern,quant", CASES)
def test_fused_solver_matches_the_torch_loop(rows, cols, block_size, pattern, quant):
    W, H = problem(rows, cols, seed=rows + cols)
    kw = dict(block_size=block_size)
    ref = sparsegpt(W, H, 0.5, pattern, quant, kernels="torch", **kw)
    got = sparsegpt(W, H, 0.5, pattern, quant, kernels="triton", **kw)
    assert torch.equal(got.mask, ref.mask)
    if pattern is not None:
        assert holds(got.weight, pattern)
    assert int(got.mask.sum()) == rows * cols // 2
    torch.testing.assert_close(got.weight, ref.weight, rtol=1e-5, atol=1e-5)
    if quant is not None:
        torch.testing.assert_close(got.quant.scale, ref.quant.scale, rtol=1e-5, atol=0)
        assert torch.equal(got.quant.zero, ref.quant.zero)
        assert torch.equal(codes(got.weight, got.quant), codes(ref.weight, ref.quant))
        assert got.quant_share == pytest.approx(ref.quant_share, rel=1e-4)


def test_kernels_option_is_checked():
    with pytest.raises(ValueError, match="kernels must be one of"):
        use_triton("fast", "cpu")
    assert use_triton("torch", "cuda") is False
    assert use_triton("auto", "cpu") is False  # CPU runs the torch loop unless forced


def test_compress_with_the_fused_kernel_matches_torch(tiny_model_dir, tmp_path):
    """The CLI end to end (joint 50% + 4-bit): --kernels triton (interpreted here) and torch agree."""
    import json

    from safetensors.torch import load_file

    from llmprune.cli import main
    from llmprune.data import builtin_text_path

    calib = tmp_path / "calib.txt"
    calib.write_text(builtin_text_path().read_text()[:30_000])
    out = {}
    for mode in ("torch", "triton"):
        with pytest.raises(SystemExit) as exc:
            main(["compress", str(tiny_model_dir), "--out", str(tmp_path / mode), "--calib", str(calib),
                  "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--wbits", "4", "--sparsity", "0.5",
                  "--kernels", mode])
        assert exc.value.code == 0
        out[mode] = {k: v for f in (tmp_path / mode).glob("model*.safetensors") for k, v in load_file(f).items()}
    # the interpreted kernel really ran (a fallback would hide a bug in the fused path behind the torch loop)
    report = json.loads((tmp_path / "triton" / "llmprune.json").read_text())
    assert report["kernel_fallbacks"] == {} and set(report["kernels_used"]) == {"triton"}
    for k, t in out["torch"].items():
        assert torch.equal(t == 0, out["triton"][k] == 0), k
        torch.testing.assert_close(out["triton"][k], t, rtol=1e-4, atol=1e-5)


def test_forcing_triton_on_cpu_without_the_interpreter_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from llmprune.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calib", "shakespeare",
              "--device", "cpu", "--kernels", "triton"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "TRITON_INTERPRET=1" in err and "--kernels torch" in err
    assert not (tmp_path / "o").exists()


class _Broken:
    """Stands in for a Triton kernel that does not compile on the device: launching it raises."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("CompilationError: at 12:8: stand-in for a broken kernel")

        return launch


def _run_compress(tiny_model_dir, tmp_path, name: str, kernels: str) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    from llmprune.cli import main
    from llmprune.data import builtin_text_path

    calib = tmp_path / "calib.txt"
    if not calib.exists():
        calib.write_text(builtin_text_path().read_text()[:30_000])
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(tiny_model_dir), "--out", str(tmp_path / name), "--calib", str(calib), "--nsamples",
              "2", "--seqlen", "16", "--device", "cpu", "--wbits", "4", "--sparsity", "0.5", "--kernels", kernels])
    assert exc.value.code == 0
    tensors = {k: v for f in (tmp_path / name).glob("model*.safetensors") for k, v in load_file(f).items()}
    return tensors, json.loads((tmp_path / name / "llmprune.json").read_text())


def test_a_kernel_that_fails_on_the_device_falls_back_to_torch_once(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """--kernels auto where the fused kernel does not compile: one warning naming it and the error, the run
    finishes with the torch loop (same bytes as --kernels torch), and the report says which loop ran."""
    import llmprune.kernels as k
    import llmprune.kernels.obs_update as ou
    ref, ref_report = _run_compress(tiny_model_dir, tmp_path, "torch", "torch")
    assert set(ref_report["kernels_used"]) == {"torch"} and ref_report["kernel_fallbacks"] == {}
    monkeypatch.setattr(k, "use_triton", lambda mode, device: mode != "torch")  # auto picks Triton, as on CUDA
    monkeypatch.setattr(ou, "_obs_update_kernel", _Broken())
    with caplog.at_level("WARNING", logger="llmprune"):
        got, report = _run_compress(tiny_model_dir, tmp_path, "auto", "auto")
    warnings = [r.getMessage() for r in caplog.records if "kernel obs_update failed" in r.getMessage()]
    assert len(warnings) == 1 and "stand-in for a broken kernel" in warnings[0]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert report["kernels_used"] == ref_report["kernels_used"]  # every linear: the torch loop
    assert "stand-in for a broken kernel" in report["kernel_fallbacks"]["obs_update"]
    assert all(layer["kernel"] == "torch" for layer in report["layers"])


def test_a_forced_kernel_that_fails_is_an_error(monkeypatch):
    import llmprune.kernels.obs_update as ou

    monkeypatch.setattr(ou, "_obs_update_kernel", _Broken())
    W, H = problem(8, 32, seed=3)
    with pytest.raises(RuntimeError, match="stand-in for a broken kernel"):
        sparsegpt(W, H, 0.5, kernels="triton", block_size=16)




def test_pack_falls_back_when_its_kernel_fails(monkeypatch, caplog):
    import llmprune.kernels as k
    from llmprune.kernels import pack24
    from llmprune.pack import _pack24

    W = torch.randn(16, 32)
    W[:, 1::2] = 0  # 2:4
    k.reset()
    monkeypatch.setattr(k, "use_triton", lambda mode, device: True)
    monkeypatch.setattr(pack24, "_pack24_kernel", _Broken())
    with caplog.at_level("WARNING", logger="llmprune"):
        values, meta = _pack24(W, "auto")
        _pack24(W, "auto")  # the second layer goes straight to torch: one warning per run
    ref = pack24.pack24_torch(W)
    assert torch.equal(values, ref[0]) and torch.equal(meta, ref[1])
    assert sum("kernel pack24 failed" in r.getMessage() for r in caplog.records) == 1
    assert k.summary() == {"pack24": {"torch": 2}} and "pack24" in k.failures()
    with pytest.raises(ValueError, match="breaks 2:4"):  # bad input is never taken for a kernel failure
        _pack24(torch.ones(4, 8), "auto")
