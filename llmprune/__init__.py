"""llmprune: one-shot compression of Hugging Face causal LMs, streamed one decoder block at a time."""

__version__ = "0.1.0"


def load(directory, device: str = "cpu", dtype: str = "auto", semi_structured: bool = False, kernels: str = "auto"):
    """(model, tokenizer) from a checkpoint directory llmprune wrote, packed 2:4 ones included (see pack.load)."""
    from llmprune.pack import load as _load

    return _load(directory, device=device, dtype=dtype, semi_structured=semi_structured, kernels=kernels)
