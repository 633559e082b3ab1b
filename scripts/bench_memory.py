"""Peak host memory of compressing a model larger than one wants to hold: a synthetic Llama-shaped model
(random bf16 weights, >= 2 billion parameters, several shards, written one block at a time so it is never
whole in memory) compressed by SparseGPT 50% through the lazy, resumable path.

Prints peak RSS of the compress process (``ru_maxrss`` of the child), the RSS of a process that only imports
llmprune/torch/transformers (the floor no streaming can remove), the model's size on disk, the bound
1.5 x (one block's weights in fp32 + its Hessians + calibration activations), and the time.

    python scripts/bench_memory.py [--layers 48 --hidden 2048 --inter 5632] [--dir /tmp/synthetic] [--keep]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tables import publish  # scripts/tables.py


def write_model(d: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int) -> int:
    """The config, the shards (one per block, plus embeddings/head), the index, a tokenizer; returns #params."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from llmprune.data import builtin_text_path

    d.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(d)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    n_files = layers + 1
    weight_map: dict[str, str] = {}

    def shard(index: int, tensors: dict[str, torch.Tensor]) -> None:
        fname = f"model-{index:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))

    params = 0
    for i in range(layers):
        p = f"model.layers.{i}"
        block = {f"{p}.self_attn.{n}.weight": rnd(hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        block |= {f"{p}.mlp.gate_proj.weight": rnd(inter, hidden), f"{p}.mlp.up_proj.weight": rnd(inter, hidden),
                  f"{p}.mlp.down_proj.weight": rnd(hidden, inter),
                  f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                  f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        shard(i + 1, block)
        params += sum(t.numel() for t in block.values())
        del block
    rest = {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    shard(n_files, rest)
    params += sum(t.numel() for t in rest.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * params},
                                                                "weight_map": weight_map}))
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([builtin_text_path().read_text()[:200_000]], vocab_size=1000, show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    return params


def add_shape_options(ap: argparse.ArgumentParser, layers: int, hidden: int, inter: int) -> None:
    """The synthetic model's shape (``write_model``'s arguments), with a benchmark's own defaults."""
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--inter", type=int, default=inter)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)


def compress_peak(model_dir: Path, out_dir: Path, nsamples: int, seqlen: int,
                  max_blocks: int | None = None) -> tuple[float, float, int]:
    """(peak RSS in MiB sampled every 50 ms, seconds, blocks done) of ``llmprune compress`` (SparseGPT 50%) in a
    fresh process; with ``max_blocks`` the run is killed once that many blocks are journaled (the peak repeats
    every block, so the first few show it)."""
    import psutil

    argv = ["compress", str(model_dir), "--out", str(out_dir), "--sparsity", "0.5", "--calib", "shakespeare",
            "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", "cpu", "--overwrite"]
    journal = out_dir.parent / f"{out_dir.name}.partial" / "journal.json"
    shutil.rmtree(journal.parent, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llmprune", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ps, peak, done = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
            done = len(json.loads(journal.read_text())["blocks"]) if journal.is_file() else done
        except (psutil.Error, OSError, ValueError):
            pass
        if max_blocks is not None and done >= max_blocks:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    seconds = time.perf_counter() - t0
    if max_blocks is None and proc.returncode:
        sys.exit(proc.stderr.read()[-2000:])
    return peak / 2**20, seconds, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_options(ap, layers=48, hidden=2048, inter=5632)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--dir", default=None, help="where to build the model (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the model and output")
    ap.add_argument("--max-blocks", type=int, default=None,
                    help="stop the compress run after this many blocks (the per-block peak repeats)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_memory.txt"))
    args = ap.parse_args()

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="llmprune-mem-"))
    model_dir, out_dir = root / "model", root / "out"
    t0 = time.perf_counter()
    params = write_model(model_dir, args.layers, args.hidden, args.inter, args.vocab, args.heads)
    gen_s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    peak, seconds, done = compress_peak(model_dir, out_dir, args.nsamples, args.seqlen, args.max_blocks)
    # the fixed cost of any run (interpreter, torch, transformers, datasets, tokenizer, calibration text):
    # the same command on a 1-block model with hidden size 64
    write_model(root / "floor", 1, 64, 128, 1000, 4)
    floor, _, _ = compress_peak(root / "floor", root / "floor-out", args.nsamples, args.seqlen)
    h, m = args.hidden, args.inter
    block_fp32 = 4 * (4 * h * h + 3 * h * m) / 2**20
    hessians = 4 * (3 * h * h + m * m) / 2**20  # q/k/v share one, o_proj, gate/up share one, down_proj
    acts = 2 * 2 * args.nsamples * args.seqlen * h / 2**20  # inputs and outputs of a block, bf16
    bound = 1.5 * (block_fp32 + hessians + acts)
    lines = [
        f"# bench_memory: synthetic llama {args.layers} x (hidden {h}, mlp {m}), vocab {args.vocab}, bf16;"
        f" SparseGPT 50%, {args.nsamples} x {args.seqlen} calibration tokens, CPU ({platform.machine()}),"
        f" torch {torch.__version__}",
        f"parameters                      {params / 1e9:.2f} B",
        f"model on disk                   {disk / 2**30:.2f} GiB ({args.layers + 1} shards; written in {gen_s:.0f} s)",
        f"peak RSS of compress            {peak:.0f} MiB ({peak / (disk / 2**20):.2f} x the model on disk)",
        f"RSS floor (same run, tiny model) {floor:.0f} MiB",
        f"peak RSS above the floor        {peak - floor:.0f} MiB  <- what the model costs",
        f"bound 1.5 x (block fp32 {block_fp32:.0f} + Hessians {hessians:.0f} + activations {acts:.0f} MiB)"
        f"  {bound:.0f} MiB",
        f"embeddings + head (bf16; read only to capture and to write) {2 * 2 * args.vocab * h / 2**20:.0f} MiB",
        f"compress wall time              {seconds:.0f} s for {done if args.max_blocks else args.layers} of"
        f" {args.layers} blocks" + (" (stopped there by --max-blocks)" if args.max_blocks else ""),
    ]
    publish(lines, args.out)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
