"""llmprune: one-shot compression of Hugging Face causal LMs, streamed one decoder block at a time.

The API (``llmprune/api.py``) is imported on first use, so ``import llmprune`` and ``llmprune --help`` stay
fast: ``llmprune.compress``, ``llmprune.shrink``, ``llmprune.evaluate``, ``llmprune.sweep``, ``llmprune.load``,
``llmprune.bench_speed``, ``llmprune.Recipe``, ``llmprune.Report``, ``llmprune.UsageError``. Packing lives in
``llmprune.api`` (``pack``, ``unpack``, ``inspect``): those names are also the package's modules.
No module of the package is named like an exported function.
"""

from llmprune.version import __version__

_API = {"compress", "evaluate", "load", "shrink", "sweep", "bench_speed", "Recipe", "Report", "UsageError",
        "make_recipe"}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name in _API or name == "api":
        import importlib

        api = importlib.import_module("llmprune.api")  # `from llmprune import api` would come back here
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
