"""One llm-compressor run, for scripts/bench_peers.py: run by the python of the benchmark's own venv (where
llm-compressor is installed; never llmprune's dependency). Loads a model directory, prunes it with the given
windows (token ids saved by the parent, so both tools see the same calibration tokens), writes the result,
and prints one JSON line with its phases.

    VENV/bin/python scripts/peers/llmc_run.py --model DIR --windows W.pt --out DIR [--method sparsegpt]
"""

from __future__ import annotations

import argparse
import json
import time

t_start = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True, help="a .pt file holding a (n, seqlen) tensor of token ids")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="sparsegpt",
                    choices=["sparsegpt", "wanda", "gptq-w4g128", "rtn", "gptq", "sparsegpt-then-rtn"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--scheme", default="W4A16", help="rtn, gptq, sparsegpt-then-rtn: the preset scheme name")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_import = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = torch.load(args.windows)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    t_load = time.perf_counter()
    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        recipe = SparseGPTModifier(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"],
                                   ignore=["re:.*lm_head"])
    elif args.method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        recipe = WandaPruningModifier(sparsity=args.sparsity, targets=["Linear"], ignore=["re:.*lm_head"])
    elif args.method == "gptq-w4g128":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    elif args.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])
    elif args.method == "rtn":  # round to nearest with the scheme's observer (llm-compressor's QuantizationModifier)
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])
    else:  # the two-stage recipe: SparseGPT, then the scheme rounded to nearest on the pruned weights
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe = [SparseGPTModifier(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"],
                                    ignore=["re:.*lm_head"]),
                  QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])]
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    t_solve = time.perf_counter()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    t_save = time.perf_counter()
    dense = [m.weight for n, m in model.named_modules()  # quantized linears are saved compressed (no weight)
             if isinstance(m, torch.nn.Linear) and "lm_head" not in n and isinstance(getattr(m, "weight", None),
                                                                                        torch.Tensor)]
    zeros, numel = sum(int((w == 0).sum()) for w in dense), sum(w.numel() for w in dense)
    print(json.dumps({"import_s": t_import - t_start, "load_s": t_load - t_import, "compress_s": t_solve - t_load,
                      "save_s": t_save - t_solve, "sparsity": zeros / numel if numel else None}))


if __name__ == "__main__":
    main()
