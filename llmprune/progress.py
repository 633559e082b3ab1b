"""Progress of long work: a tqdm bar by default, silence, or a callback a pipeline routes where it likes.

``Progress`` is what the API's ``progress=`` argument takes: ``True`` (a tqdm bar on stderr), ``False`` or
``None`` (nothing), or a callable ``fn(task, done, total)`` called after each step (e.g. each block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar, Union

from tqdm.auto import tqdm

T = TypeVar("T")
Callback = Callable[[str, int, int], None]
Progress = Union[bool, None, Callback]  # noqa: UP007 (a runtime alias: `|` on a Callable alias fails in 3.11)


def track(items: Iterable[T], total: int, task: str, progress: Progress = True, unit: str = "block") -> Iterator[T]:
    """Yield ``items``, reporting each finished one as ``progress`` says."""
    if progress is True:
        yield from tqdm(items, total=total, desc=task, unit=unit, leave=False)
        return
    done = 0
    for item in items:
        yield item
        done += 1
        if callable(progress):
            progress(task, done, total)


@contextlib.contextmanager
def library_bars(progress: Progress) -> Iterator[None]:
    """transformers', datasets' and the hub client's own tqdm bars (loading and writing shards, downloads,
    dataset preparation) off while ``progress`` is not True, as ours are; as they were afterwards."""
    if progress is True:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf_logging

    was = (hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(),
           not hub.are_progress_bars_disabled())
    hf_logging.disable_progress_bar()  # the hub's too
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            hf_logging.enable_progress_bar()
        if was[1]:
            datasets.enable_progress_bars()
        if was[2]:
            hub.enable_progress_bars()
