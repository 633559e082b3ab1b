"""What only a CUDA GPU can show, checked in one short run (a few minutes on one H100/H200): each line says
what was compared and whether it held. Exits 1 if any check fails; on a machine without CUDA it says so and
exits 0. docs/cuda.md lists what these cover and what stays unverified.

    python scripts/gpu_check.py [--out scripts/results/gpu_check.txt]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str):
    def wrap(fn):
        def run():
            t0 = time.perf_counter()
            try:
                ok, detail = fn()
            except Exception as exc:  # a crash is a failed check, with its cause
                ok, detail = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                traceback.print_exc()
            RESULTS.append((name, ok, f"{detail} ({time.perf_counter() - t0:.1f} s)"))
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

        return run

    return wrap


def problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    X = torch.randn(cols, 2 * cols, device="cuda", generator=g)
    X[: cols // 4] *= 3
    return torch.randn(rows, cols, device="cuda", generator=g), X @ X.T / X.shape[1]


@check("hessian: bf16 tensor-core product == fp32 product (rtol 1e-4)")
def hessian_paths():
    from llmprune.hessian import MM_OUT_DTYPE, hessian_update

    x = torch.randn(4096, 2048, device="cuda").bfloat16()
    H16, _ = hessian_update(torch.zeros(2048, 2048, device="cuda"), 0, x, "auto")
    H32, _ = hessian_update(torch.zeros(2048, 2048, device="cuda"), 0, x, "fp32")
    err = float((H16 - H32).abs().max() / H32.abs().max())
    return err < 1e-4, f"tensor cores {'on' if MM_OUT_DTYPE else 'off (torch < 2.8)'}, max rel diff {err:.2e}"


@check("sparsegpt: fused Triton kernel == torch loop (masks, codes; weights to 1e-4)")
def fused_solver():
    import llmprune.kernels as k
    from llmprune.pattern import Pattern
    from llmprune.quant import QuantSpec, codes
    from llmprune.solvers.sparsegpt import sparsegpt

    details = []
    ok = True
    for label, pattern, quant in (("50%", None, None), ("2:4", Pattern(2, 4), None),
                                  ("50% + w4g128", None, QuantSpec(4, 128)), ("2:4 + w4", Pattern(2, 4), QuantSpec(4))):
        W, H = problem(4096, 4096)
        k.reset()
        t0 = time.perf_counter()
        ref = sparsegpt(W, H, 0.5, pattern, quant, kernels="torch")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        got = sparsegpt(W, H, 0.5, pattern, quant, kernels="triton")
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        same = torch.equal(got.mask, ref.mask) and torch.allclose(got.weight, ref.weight, rtol=1e-4, atol=1e-4)
        if quant is not None:
            same = same and torch.equal(codes(got.weight, got.quant), codes(ref.weight, ref.quant))
        ok = ok and same and not k.failures()
        details.append(f"{label}: {'same' if same else 'DIFFERENT'}, torch {t1 - t0:.2f} s / triton {t2 - t1:.2f} s")
    return ok, "; ".join(details)


@check("pack24 / unpack24 Triton == torch twins (fp16, bf16)")
def pack_kernels():
    from llmprune.kernels import pack24

    ok = True
    for dtype in (torch.float16, torch.bfloat16):
        W = torch.randn(4096, 4096, device="cuda", dtype=dtype)
        W.view(4096, -1, 4)[..., 1::2] = 0
        a, b = pack24.pack24(W), pack24.pack24_torch(W)
        ok = ok and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        ok = ok and torch.equal(pack24.unpack24(*a, 4096), W)
    return ok, "bit for bit" if ok else "DIFFERENT"


@check("engine: prefetch on == off on a bare 'cuda' device")
def engine_paths():
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from llmprune.engine import Stream

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    batches = [torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    outs = []
    for prefetch in (True, False):
        s = Stream(copy.deepcopy(base), batches, "cuda", prefetch=prefetch, progress=False)
        s.run(desc="check")
        outs.append([h.float().cpu() for h in s.hidden])
    same = all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    return same, f"device {s.device}, {len(outs[0])} batches {'identical' if same else 'DIFFERENT'}"


@check("compress SmolLM2-135M on 'cuda': sequential 50% + w4, kernels auto, then eval-ppl")
def end_to_end():
    import llmprune

    t0 = time.perf_counter()
    report = llmprune.compress("smollm2-135m", calib="shakespeare", nsamples=16, seqlen=256, device="cuda",
                               sparsity=0.5, wbits=4, group_size=128, progress=False)
    wall = time.perf_counter() - t0
    ppl = llmprune.evaluate(report.module, "shakespeare", tokenizer=report.tokenizer, seqlen=256, max_windows=16,
                            device="cuda", progress=False)["ppl"]
    ok = set(report.kernels_used) == {"triton"} and not report.kernel_fallbacks and ppl < 1e4
    return ok, (f"kernels {report.kernels_used}, fallbacks {report.kernel_fallbacks or 'none'}, sparsity"
                f" {report.global_sparsity:.4f}, held-out ppl {ppl:.2f}, {wall:.0f} s")


@check("inverse Hessian factor: peak device memory over one H (n = 8192)")
def factor_memory():
    from llmprune.solvers.hinv import inverse_hessian_cholesky

    _, H = problem(8, 8192)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    inverse_hessian_cholesky(H, 0.01)
    torch.cuda.synchronize()
    ratio = (torch.cuda.max_memory_allocated() - base) / (H.numel() * 4)
    return True, f"{ratio:.2f} x H extra at peak"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_check.txt"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (scripts/kernels_aot.py compiles the kernels without one)")
        return 0
    card = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
    print(f"{card}, torch {torch.__version__}, {platform.node()}", flush=True)
    for fn in (hessian_paths, fused_solver, pack_kernels, engine_paths, end_to_end, factor_memory):
        fn()
    lines = [f"# scripts/gpu_check.py on {card}, torch {torch.__version__}", "",
             "| check | held | detail |", "| --- | --- | --- |"]
    lines += [f"| {n} | {'yes' if ok else 'NO'} | {d} |" for n, ok, d in RESULTS]
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if all(ok for _, ok, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
