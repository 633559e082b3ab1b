"""llmprune: one-shot compression of Hugging Face causal LMs, streamed one decoder block at a time.

The API (``llmprune/api.py``) is imported on first use, so ``import llmprune`` and ``llmprune --help`` stay
fast: ``llmprune.compress``, ``llmprune.evaluate``, ``llmprune.load``, ``llmprune.Recipe``, ``llmprune.Report``,
``llmprune.UsageError``. Packing lives in ``llmprune.api`` (``pack``, ``unpack``, ``inspect``): those names
are also the package's modules. No module of the package is named like an exported function.
"""

from llmprune.version import __version__

_API = {"compress", "evaluate", "load", "Recipe", "Report", "UsageError", "make_recipe"}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name in _API:
        from llmprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
