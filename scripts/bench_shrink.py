"""Structured pruning of SmolLM2-135M: obs vs l1 vs wanda, held-out perplexity, parameters and CPU prefill speed.

Calibration on the Shakespeare train part, perplexity on its held-out tail, the same windows for every row.
Budgets are fractions of the blocks' parameters: MLP channels only, heads (1 of 3 per KV group) + MLP, and 2
blocks dropped + MLP, the MLP share chosen so the total is about the budget (channels in multiples of 64).
Prefill speed: the obs model of each structure against the dense one, interleaved, medians (bench_speed).

    python scripts/bench_shrink.py [--nsamples 16] [--seqlen 256] [--budgets 0.2,0.35] [--structures mlp,heads+mlp]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tables import publish  # scripts/tables.py

import llmprune
from llmprune.calibration import calibration_set
from llmprune.data import eval_windows, load_text, tokenize
from llmprune.loading import load_model
from llmprune.perplexity import perplexity
from llmprune.recipe import Recipe
from llmprune.shrinking import ShrinkSpec, count_params, shrink_model


def block_params(model) -> tuple[int, int, int]:
    """(attention q+o parameters per head-group fraction basis, MLP parameters, block parameters) of block 0."""
    block = model.model.layers[0]
    attn = sum(p.numel() for p in block.self_attn.parameters())
    mlp = sum(p.numel() for p in block.mlp.parameters())
    return attn, mlp, sum(p.numel() for p in block.parameters())


def mlp_fraction(removed_per_block: float, mlp: int, channels: int, align: int = 64) -> float:
    """The --mlp fraction whose aligned width removes at least ``removed_per_block`` MLP parameters: the widest
    multiple of ``align`` at or below the exact width (rounding to the nearest multiple, as shrink does, can
    land under the budget: 1152 of 1536 channels is 18.7% of SmolLM2's block parameters, not 20%)."""
    per_channel = mlp / channels
    keep = int((channels - removed_per_block / per_channel) // align) * align
    return max(0.0, 1 - keep / channels)


def structures(model, budget: float) -> dict[str, ShrinkSpec]:
    """Each structure's spec removing at least ``budget`` of the blocks' parameters."""
    cfg = model.config
    _, mlp, total = block_params(model)
    channels = cfg.intermediate_size
    n = cfg.num_hidden_layers
    qo = 2 * cfg.hidden_size * cfg.head_dim * cfg.num_key_value_heads  # 1 query head per KV group: q rows + o cols
    out = {"mlp": ShrinkSpec(mlp=mlp_fraction(budget * total, mlp, channels))}
    out["heads+mlp"] = ShrinkSpec(heads=1 / 3, mlp=mlp_fraction(max(0.0, budget * total - qo), mlp, channels))
    drop = 2
    rest = (budget * n * total - drop * total) / (n - drop)  # per kept block
    out["2 blocks+mlp"] = ShrinkSpec(drop_blocks=drop, mlp=mlp_fraction(max(0.0, rest), mlp, channels))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--budgets", default="0.2,0.35")
    ap.add_argument("--methods", default="obs,l1,wanda")
    ap.add_argument("--structures", default="mlp,heads+mlp,2 blocks+mlp")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_shrink.txt"))
    args = ap.parse_args()

    model, tokenizer, _ = load_model("smollm2-135m")
    pristine = copy.deepcopy(model)
    recipe = Recipe(calib="shakespeare", nsamples=args.nsamples, seqlen=args.seqlen, device="cpu")
    windows, _ = calibration_set(tokenizer, model, recipe.resolve().calibration)
    held_out = eval_windows(tokenize(tokenizer, load_text("shakespeare", "test")[0]), args.seqlen,
                            max_windows=args.eval_windows)
    cpu = torch.device("cpu")
    dense_ppl = perplexity(model, held_out, cpu, progress=False)
    _, _, block = block_params(model)
    blocks_total = block * model.config.num_hidden_layers
    rows, speed_dirs = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-shrink-"))
    pristine.save_pretrained(tmp / "dense")
    tokenizer.save_pretrained(tmp / "dense")
    for budget in (float(b) for b in args.budgets.split(",")):
        for struct, spec in structures(model, budget).items():
            if struct not in args.structures.split(","):
                continue
            for method in args.methods.split(","):
                m = copy.deepcopy(pristine)
                s = ShrinkSpec(spec.mlp, spec.heads, spec.drop_blocks, method, spec.align)
                t0 = time.perf_counter()
                report = shrink_model(m, tokenizer, recipe.resolve(), s, progress=False)
                seconds = time.perf_counter() - t0
                removed = 1 - (count_params(m) - (count_params(pristine) - blocks_total)) / blocks_total
                ppl = perplexity(m, held_out, cpu, progress=False)
                rows.append((budget, struct, method, removed, report["sizes"]["mlp_channels"][1],
                             (report["sizes"]["heads"] or [9, 9])[1], report["sizes"]["blocks"][1], ppl, seconds))
                print(rows[-1], flush=True)
                if method == "obs":
                    d = tmp / f"{budget}-{struct.replace(' ', '_')}"
                    m.save_pretrained(d)
                    tokenizer.save_pretrained(d)
                    speed_dirs[(budget, struct)] = d
                del m
    speed = llmprune.bench_speed([tmp / "dense", *speed_dirs.values()], tokens=512, repeats=5, new_tokens=16,
                                     device="cpu")
    prefill = {key: r["prefill_tok_s"] / speed[0]["prefill_tok_s"] for key, r in zip(speed_dirs, speed[1:],
                                                                                       strict=True)}
    decode = {key: r["decode_tok_s"] / speed[0]["decode_tok_s"] for key, r in zip(speed_dirs, speed[1:],
                                                                                     strict=True)}
    lines = [
        f"# bench_shrink: SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} Shakespeare (train part),"
        f" held-out {held_out.shape[0]} x {args.seqlen} (dense ppl {dense_ppl:.3f}); CPU, {os.cpu_count()} cores,"
        f" {platform.machine()}, torch {torch.__version__}",
        "# removed = fraction of the blocks' parameters; speed = prefill / decode tokens/s of the obs model over"
        " the dense one (512-token prefill, batch 1, 5 interleaved repeats, medians)",
        f"{'budget':>6} {'structure':<14} {'method':<6} {'removed':>8} {'mlp':>5} {'heads':>5} {'blocks':>6}"
        f" {'ppl':>9} {'shrink s':>9} {'prefill x':>9} {'decode x':>9}",
    ]
    for budget, struct, method, removed, mlp, heads, blocks, ppl, seconds in rows:
        sp = f"{prefill[(budget, struct)]:>9.2f} {decode[(budget, struct)]:>9.2f}" if method == "obs" else ""
        lines.append(f"{budget:>6.2f} {struct:<14} {method:<6} {removed:>8.1%} {mlp:>5} {heads:>5} {blocks:>6}"
                     f" {ppl:>9.2f} {seconds:>9.1f} {sp}")
    publish(lines, args.out)
    shutil.rmtree(tmp, ignore_errors=True)  # the saved models (~3 GB)


if __name__ == "__main__":
    main()
