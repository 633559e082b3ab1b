"""The one way the benchmark scripts publish a result table: print it and write it under scripts/results/."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: str | Path, echo: bool = True) -> Path:
    """Print ``lines`` (unless they were printed as they came) and write them to ``out``, one per line."""
    text = "\n".join(lines) + "\n"
    if echo:
        print(text, end="")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
