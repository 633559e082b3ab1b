"""llm-compressor's preset scheme names (compressed-tensors' ``PRESET_SCHEMES``) as llmprune recipes: the weights'
grid, bits, group size and symmetry, and the input activations' quantization a runtime applies.

Pure data (no torch): the recipe resolves ``--scheme`` with it before anything is imported. tests/test_formats.py
checks every entry against the installed compressed-tensors' own presets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActSpec:
    """Input activation quantization, dynamic (its scales computed by the runtime from each token or group)."""

    type: str  # int or float
    bits: int  # 8 (int8, FP8 E4M3) or 4 (int4, E2M1)
    strategy: str  # token: one scale per token; group: one per group_size inputs of a token
    group_size: int | None = None
    scale_dtype: str | None = None  # "torch.uint8": E8M0 (MX) scales

    def config(self) -> dict:
        """The ``input_activations`` entry, as compressed-tensors serialises its QuantizationArgs."""
        out: dict = {"num_bits": self.bits, "type": self.type, "symmetric": True, "group_size": self.group_size,
                     "strategy": self.strategy, "dynamic": True}
        if self.scale_dtype is not None:
            out["scale_dtype"] = self.scale_dtype
        return out

    @property
    def label(self) -> str:
        kind = {"int": f"int{self.bits}", "float": "fp8" if self.bits == 8 else "fp4"}[self.type]
        return f"{kind} per {self.strategy}" + (f" {self.group_size}" if self.group_size else "")


@dataclass(frozen=True)
class Scheme:
    grid: str  # int, fp8, nvfp4, mxfp4
    wbits: int
    group_size: int  # -1 per channel, 0 per tensor
    sym: bool = True
    act: ActSpec | None = None


INT8_TOKEN = ActSpec("int", 8, "token")
INT4_TOKEN = ActSpec("int", 4, "token")
FP8_TOKEN = ActSpec("float", 8, "token")

SCHEMES: dict[str, Scheme] = {
    **{f"W{b}A16": Scheme("int", b, 128) for b in range(2, 9)},
    **{f"W{b}A8": Scheme("int", b, 128, act=INT8_TOKEN) for b in range(2, 8)},
    **{f"W{b}A4": Scheme("int", b, 128, act=INT4_TOKEN) for b in range(2, 5)},
    "W4A16_ASYM": Scheme("int", 4, 128, sym=False),
    "W8A8": Scheme("int", 8, -1, act=INT8_TOKEN),
    "INT8": Scheme("int", 8, -1, act=INT8_TOKEN),
    "W4AFP8": Scheme("int", 4, 128, act=FP8_TOKEN),
    "FP8_DYNAMIC": Scheme("fp8", 8, -1, act=FP8_TOKEN),
    "NVFP4A16": Scheme("nvfp4", 4, 16),
    "MXFP4A16": Scheme("mxfp4", 4, 32),
    "MXFP4": Scheme("mxfp4", 4, 32, act=ActSpec("float", 4, "group", 32, "torch.uint8")),
}

# preset names llmprune does not write, and why (one line each, with what to use instead)
REFUSED = {
    "FP8": "FP8 quantizes activations with static per-tensor scales calibrated by an observer, which llmprune does"
           " not compute: use --scheme FP8_DYNAMIC (per-token scales computed at run time)",
    "NVFP4": "NVFP4 quantizes activations with a global scale calibrated by an observer, which llmprune does not"
             " compute: use --scheme NVFP4A16 (weights only)",
    "FP8_BLOCK": "FP8_BLOCK's 128x128 weight blocks are not a grid llmprune has: use --scheme FP8_DYNAMIC",
    "MXFP4XFP8": "MXFP4XFP8's FP8 group activations are not written by llmprune: use --scheme MXFP4 or MXFP4A16",
    **{n: f"{n} is not a grid llmprune has: use --scheme MXFP4A16 or FP8_DYNAMIC"
       for n in ("MXFP6A16", "MXFP6A8", "MXFP8A16", "MXFP8")},
    "UNQUANTIZED": "UNQUANTIZED quantizes nothing: drop --scheme",
}

# names people use for presets that compressed-tensors calls otherwise
ALIASES = {"W8A8-FP8": "FP8_DYNAMIC", "W8A8_FP8": "FP8_DYNAMIC", "W8A8-INT8": "W8A8", "W8A8_INT8": "W8A8",
           "FP8-DYNAMIC": "FP8_DYNAMIC"}


def scheme_error(name: str) -> str | None:
    """Why ``name`` cannot be used (None when it can)."""
    key = name.upper()
    if key in SCHEMES:
        return None
    if key in REFUSED:
        return f"--scheme {name}: {REFUSED[key]}"
    if key in ALIASES:
        return f"--scheme {name}: compressed-tensors names it {ALIASES[key]}; pass --scheme {ALIASES[key]}"
    return (f"unknown scheme {name!r}: choose one of {', '.join(sorted(SCHEMES))} (llm-compressor's preset names)")


def activations(scheme: str | None) -> ActSpec | None:
    """The input activations' quantization of a (resolved) scheme name; None: weights only."""
    return SCHEMES[scheme].act if scheme is not None else None
