"""llmprune: one-shot compression of Hugging Face causal LMs, streamed one decoder block at a time.

The API (``llmprune/api.py``) is imported on first use, so ``import llmprune`` and ``llmprune --help`` stay
fast: ``llmprune.compress``, ``llmprune.shrink``, ``llmprune.evaluate``, ``llmprune.sweep``, ``llmprune.load``,
``llmprune.bench_speed``, ``llmprune.Recipe``, ``llmprune.Report``, ``llmprune.UsageError``. Packing lives in
``llmprune.api`` (``pack``, ``unpack``, ``inspect``; ``pack`` is also the name of the module that packs).
No module of the package is named like an exported function.
"""

from llmprune.version import __version__

_API = {"compress", "evaluate", "load", "shrink", "sweep", "Recipe", "Report", "UsageError", "make_recipe"}
_TOOLS = {"bench_speed": "llmprune.speed"}  # built on the API, outside it

__all__ = ["__version__", *sorted(_API | set(_TOOLS))]


def __getattr__(name: str):
    if name in _API or name in _TOOLS or name == "api":
        import importlib

        # importlib: `from llmprune import api` would come back here
        module = importlib.import_module(_TOOLS.get(name, "llmprune.api"))
        return module if name == "api" else getattr(module, name)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
