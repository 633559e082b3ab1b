"""``llmprune sweep``: methods × sparsities (× bits) on one calibration set, every cell evaluated alike.

Every cell is compressed from the same calibration windows (made once, with block 0's inputs captured once)
and evaluated on the same evaluation windows; the dense model is evaluated once. Cells run one after another
on one in-memory model restored from a pristine copy between them. Each finished cell is written at once to
``DIR/cells/<key>.json`` (atomically) under a key that hashes everything its result depends on, so
re-running the same command skips it and a changed grid runs only the new cells. The tables and the plot are
written from all the cells at the end.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.calibration import calibration_set
from llmprune.compression import RunSpec, compress_model
from llmprune.engine import resolve_device
from llmprune.errors import UsageError
from llmprune.pattern import parse_pattern
from llmprune.perplexity import evaluation_windows, perplexity
from llmprune.progress import Progress, track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    method: str
    sparsity: str  # "0.5", or an N:M pattern such as "2:4"
    wbits: int | None

    @property
    def label(self) -> str:
        return f"{self.method} {self.sparsity}" + (f" w{self.wbits}" if self.wbits else "")


def _split(value: str | list | tuple | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [v.strip() for v in items if v.strip()]


def grid(methods, sparsities, wbits=None) -> list[Cell]:
    """The cells of methods × sparsities × bits (``wbits``: e.g. "none,4"; default: no quantization)."""
    ms, ss = _split(methods), _split(sparsities)
    if not ms or not ss:
        raise UsageError("a sweep needs --methods and --sparsities, e.g. --methods sparsegpt,wanda"
                         " --sparsities 0.5,0.7,2:4")
    bits: list[int | None] = []
    for b in _split(wbits) or ["none"]:
        if b.lower() == "none":
            bits.append(None)
        elif b.isdigit():
            bits.append(int(b))
        else:
            raise UsageError(f"--wbits {b!r} in a sweep: use integers 2..8 or 'none', comma-separated")
    for s in ss:
        if ":" not in s:
            try:
                float(s)
            except ValueError:
                raise UsageError(f"--sparsities {s!r}: use fractions such as 0.5 or patterns such as 2:4") from None
    return [Cell(m, s, b) for b in bits for m in ms for s in ss]


class CellStore:
    """``DIR/cells/<key>.json``, one file per finished cell, each written whole (temp file + rename)."""

    def __init__(self, out: Path):
        self.dir = Path(out) / "cells"
        self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        path = self.dir / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: str, row: dict) -> None:
        _write_atomic(self.dir / f"{key}.json", json.dumps(row, indent=2, default=str) + "\n")


def _write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak so far


def run_sweep(
    model: nn.Module, tokenizer, base: RunSpec, cells: list[tuple[Cell, RunSpec]], evals: list[str], out: Path, *,
    model_name: str, eval_seqlen: int | None = None, max_windows: int | None = None, eval_batch_size: int = 4,
    save: Callable[[Cell, nn.Module, dict], None] | None = None,
    extra: Callable[[Cell | None, nn.Module], dict] | None = None, extra_key: object = None,
    progress: Progress = True,
) -> list[dict]:
    """Compress and evaluate every cell; return the rows (dense first) and write the tables and the plot.

    ``base``: the shared run (its calibration, device, evaluation length); ``cells``: each with its run
    (api.sweep resolves them from the shared recipe).

    ``save(cell, model, report)``, when given, keeps each cell's checkpoint (the caller writes it);
    ``extra(cell, model)`` adds further scores to each row (zero-shot accuracies: ``zero_shot``), and
    ``extra_key`` (e.g. the task names) is part of every cell's key.
    """
    device = resolve_device(base.device)
    windows, calib = calibration_set(tokenizer, model, base.calibration)
    eval_sets = {}
    for name in evals:
        w, info = evaluation_windows(tokenizer, model, name, eval_seqlen or base.calibration.seqlen, max_windows)
        eval_sets[name] = (w, info)
    eval_spec = {n: {"sha": hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16], **i}
                 for n, (w, i) in eval_sets.items()}
    store = CellStore(out)
    # bits per weight of the linears as a cell's checkpoint stores them: wbits, else the model dtype's
    dtype_bits = 8 * next(p.dtype.itemsize for p in model.parameters() if p.is_floating_point())
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    captured: dict = {}

    def evaluate_all() -> dict[str, float]:
        return {n: perplexity(model, w, device, eval_batch_size, progress=False) for n, (w, _) in eval_sets.items()}

    dense_key = _key("dense", model_name, eval_spec, extra_key, dtype_bits)
    dense = store.get(dense_key)
    if dense is None:
        dense = {"method": "dense", "sparsity": "0", "wbits": None, "bits": dtype_bits, "label": "dense",
                 "global_sparsity": 0.0,
                 "ppl": evaluate_all(), "compress_s": 0.0, "peak_mib": round(_peak_mib(device), 1),
                 "scores": extra(None, model) if extra else {}}
        store.put(dense_key, dense)
    rows = [dense]
    todo = []
    for cell, run in cells:
        key = _key(model_name, run.recipe, calib["sha256"], eval_spec, extra_key, dtype_bits)
        row = store.get(key)
        if row is None:
            todo.append((cell, run, key))
        rows.append(row or {"key": key})
    if len(todo) < len(cells):
        log.info("sweep: %d of %d cells already done in %s", len(cells) - len(todo), len(cells), out)
    done: dict[str, dict] = {}
    try:
        for cell, run, key in track(todo, len(todo), "sweep", progress, unit="cell"):
            model.load_state_dict(pristine)
            t0 = time.perf_counter()
            report = compress_model(model, tokenizer, run, windows, progress=False, captured=captured,
                                    calibration=calib)
            seconds = time.perf_counter() - t0
            row = {"method": cell.method, "sparsity": cell.sparsity, "wbits": cell.wbits, "label": cell.label,
                   "bits": cell.wbits or dtype_bits,
                   "global_sparsity": report["global_sparsity"], "ppl": evaluate_all(),
                   "compress_s": round(seconds, 3), "peak_mib": round(_peak_mib(device), 1),
                   "scores": extra(cell, model) if extra else {},
                   "recipe": copy.deepcopy(run.recipe), "report": {k: report[k] for k in ("calibration", "timings",
                                                                                 "sequential", "allocation")}}
            if save is not None:
                save(cell, model, report)
            store.put(key, row)
            done[key] = row
            log.info("sweep: %s: %s", cell.label, ", ".join(f"{n} {p:.3f}" for n, p in row["ppl"].items()))
    finally:
        model.load_state_dict(pristine)
    rows = [done.get(r.get("key"), r) if "key" in r else r for r in rows]
    source = calib["source"].split(" (", 1)[0]  # the built-in text's description ends with its file path
    title = f"{model_name}, calibration {source} ({calib['nsamples']} x {calib['seqlen']} tokens)"
    write_outputs(out, rows, list(eval_sets), title)
    return rows


def check_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError("--tasks runs lm-eval-harness: pip install 'llmprune[lmeval]' (or lm-eval)") from None


def task_name(task: str) -> str:
    """A --tasks entry's name: an lm-eval task name as given, or the ``task`` a local task YAML file defines."""
    path = Path(task).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        return task
    if not path.is_file():
        raise UsageError(f"lm-eval task file {task!r} does not exist: check the path")
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"lm-eval task file {task!r} is not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
        raise UsageError(f"lm-eval task file {task!r} names no task: give it a 'task: NAME' key")
    return spec["task"]


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], batch_size: int = 8) -> dict[str, float]:
    """Accuracy of ``model`` on each lm-eval task (its Python API, with our model object), by task name: a task
    is an lm-eval task name or a task YAML file (lm-eval's task format, e.g. a local dataset). A task that
    cannot be had (no network for its data, an unknown name) is a one-line error naming it."""
    check_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    files = sorted({str(Path(t).expanduser().resolve().parent) for t in tasks if task_name(t) != t})
    manager = TaskManager(include_path=files or None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    scores = {}
    for task in tasks:
        name = task_name(task)
        try:
            result = simple_evaluate(model=lm, tasks=[name], task_manager=manager, verbosity="ERROR")
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UsageError(f"lm-eval task {task!r} cannot run ({first}): check its name, and that its data is"
                             " in the local cache (no network)") from None
        metrics = result["results"][name]
        acc = next((v for k, v in metrics.items() if k.split(",")[0] in ("acc_norm", "acc", "exact_match")
                    and isinstance(v, int | float)), None)
        scores[name] = float(acc) if acc is not None else float("nan")
    return scores


def table_rows(rows: list[dict], evals: list[str], tasks: list[str]) -> list[list[str]]:
    out = []
    for r in rows:
        bits = r.get("bits") or r["wbits"] or 16  # rows stored before "bits" was kept: a 16-bit model's
        out.append([r["method"], r["sparsity"], str(bits), *(f"{r['ppl'][e]:.3f}" for e in evals),
                    *(f"{r.get('scores', {}).get(t, float('nan')):.4f}" for t in tasks),
                    f"{r['global_sparsity']:.4f}", f"{r['compress_s']:.1f}", f"{r['peak_mib']:.0f}"])
    return out


def write_outputs(out: Path, rows: list[dict], evals: list[str], title: str) -> None:
    """results.csv, results.json, results.md and ppl_vs_sparsity.png, from the same rows."""
    tasks = sorted({t for r in rows for t in r.get("scores", {})})
    header = ["method", "sparsity", "bits", *(f"ppl {e}" for e in evals), *(f"acc {t}" for t in tasks),
              "global sparsity", "compress s", "peak MiB"]
    body = table_rows(rows, evals, tasks)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    _write_atomic(out / "results.csv", buf.getvalue())
    _write_atomic(out / "results.json", json.dumps({"title": title, "evals": evals, "rows": rows}, indent=2,
                                                   default=str) + "\n")
    md = [f"<!-- {title} -->", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    _write_atomic(out / "results.md", "\n".join(md) + "\n")
    _write_atomic(out / "ppl_vs_sparsity.png", plot(rows, evals, title))


def plot(rows: list[dict], evals: list[str], title: str) -> bytes:
    """ppl_vs_sparsity.png: ``figure``'s, as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = figure(rows, evals, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _spread_labels(ax, labels: list) -> None:
    """Move the N:M points' labels up until none overlaps another: several methods' 2:4 cells share one x and
    often have close perplexities, and their labels printed over each other. A moved label gets a thin line
    to its point."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    placed = []  # the labels' text boxes (an Annotation's own extent also spans its line)
    for ann in sorted(labels, key=lambda a: a.xy[1]):  # from the lowest point up
        moved = False
        for _ in range(len(labels)):
            box = Text.get_window_extent(ann, renderer)
            hit = next((b for b in placed if box.overlaps(b)), None)
            if hit is None:
                break
            x, y = ann.xyann
            ann.xyann = (x, y + (hit.y1 - box.y0 + 1) * 72 / ax.figure.dpi)  # pixels to points
            moved = True
        if moved:  # as Annotation.__init__ builds it for arrowprops={"arrowstyle": "-", ...}
            from matplotlib.patches import FancyArrowPatch

            ann.arrowprops = dict(arrowstyle="-", lw=0.5, color=ann.get_color())
            ann._arrow_relpos = (0.0, 0.5)
            ann.arrow_patch = FancyArrowPatch((0, 0), (1, 1), **ann.arrowprops)
        placed.append(Text.get_window_extent(ann, renderer))


def figure(rows: list[dict], evals: list[str], title: str):
    """One panel per evaluation set: perplexity (log axis) against sparsity, one line per method (and bits),
    N:M cells as marked points labelled in their method's colour (labels kept apart), the dense perplexity as
    a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(evals), figsize=(6.4 * len(evals), 4.6), squeeze=False)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "dense":
            groups.setdefault(r["method"] + (f" w{r['wbits']}" if r["wbits"] else ""), []).append(r)
    labels: dict = {}
    for ax, e in zip(axes[0], evals, strict=True):
        labels[ax] = []
        for k, (name, rs) in enumerate(sorted(groups.items())):
            color = f"C{k % 10}"
            line = sorted((float(r["sparsity"]), r["ppl"][e]) for r in rs if ":" not in r["sparsity"])
            if line:
                ax.plot(*zip(*line, strict=True), marker="o", color=color, label=name)
            for r in rs:
                if ":" in r["sparsity"]:
                    pat = parse_pattern(r["sparsity"])
                    ax.scatter([pat.sparsity], [r["ppl"][e]], marker="*", s=140, color=color, zorder=3,
                               label=f"{name} {r['sparsity']}")
                    labels[ax].append(ax.annotate(r["sparsity"], (pat.sparsity, r["ppl"][e]),
                                                  textcoords="offset points", xytext=(6, 4), fontsize=8,
                                                  color=color))
        if dense is not None and math.isfinite(dense["ppl"][e]):
            ax.axhline(dense["ppl"][e], color="gray", linestyle="--", label=f"dense {dense['ppl'][e]:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"perplexity ({e})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    for ax, anns in labels.items():
        _spread_labels(ax, anns)
    return fig
