"""llmprune: one-shot compression of Hugging Face causal LMs, streamed one decoder block at a time."""

__version__ = "0.1.0"
