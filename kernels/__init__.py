"""Triton kernels, installed as ``llmprune.kernels``. Each kernel will sit beside its torch reference."""
