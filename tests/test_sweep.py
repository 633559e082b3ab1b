"""llmprune sweep: every cell equals a separate compress + eval-ppl; tables and plot agree; resumable."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

import llmprune
from llmprune.cli import main
from llmprune.data import builtin_text_path

CALIB = dict(nsamples=4, seqlen=32, device="cpu")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("sweep-text") / "text.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


def run_sweep(model_dir, out, text, methods="sparsegpt,magnitude", sparsities="0.5,2:4"):
    return llmprune.sweep(model_dir, out, methods=methods, sparsities=sparsities, evals=str(text),
                              calib=str(text), split="train", max_windows=4, progress=False, **CALIB)


def test_each_cell_equals_a_separate_compress_and_eval(tiny_model_dir, text, tmp_path):
    rows = run_sweep(tiny_model_dir, tmp_path / "s", text)
    assert [r["label"] for r in rows] == ["dense", "sparsegpt 0.5", "sparsegpt 2:4", "magnitude 0.5",
                                          "magnitude 2:4"]
    # the sweep computes in the dtype compress writes (bf16 for this fp32 model), its table says so
    assert [r["bits"] for r in rows] == [16] * 5
    dense = llmprune.evaluate(tiny_model_dir, str(text), seqlen=32, max_windows=4, device="cpu", progress=False,
                              dtype="bfloat16")
    assert rows[0]["ppl"][str(text)] == dense["ppl"]
    for row, (method, extra) in zip(rows[1:], [("sparsegpt", {"sparsity": 0.5}), ("sparsegpt", {"pattern": "2:4"}),
                                               ("magnitude", {"sparsity": 0.5}), ("magnitude", {"pattern": "2:4"})],
                                    strict=True):
        out = tmp_path / row["label"].replace(" ", "_").replace(":", "of")
        report = llmprune.compress(tiny_model_dir, out, method=method, calib=str(text), split="train",
                                   progress=False, **CALIB, **extra)
        assert report.global_sparsity == row["global_sparsity"]
        got = llmprune.evaluate(out, str(text), seqlen=32, max_windows=4, device="cpu", progress=False)
        assert got["ppl"] == row["ppl"][str(text)], row["label"]
    # the four outputs agree with each other
    d = tmp_path / "s"
    table = list(csv.DictReader((d / "results.csv").open()))
    data = json.loads((d / "results.json").read_text())
    assert len(table) == len(data["rows"]) == 5
    for t, r in zip(table, data["rows"], strict=True):
        assert t["method"] == r["method"] and float(t[f"ppl {text}"]) == pytest.approx(r["ppl"][str(text)], abs=1e-3)
    md = (d / "results.md").read_text().splitlines()
    assert len(md) == 3 + 5 and all(f"{r['ppl'][str(text)]:.3f}" in line for r, line in zip(data["rows"], md[3:],
                                                                                              strict=True))
    png = (d / "ppl_vs_sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_killed_sweep_resumes_and_a_changed_grid_runs_only_new_cells(tiny_model_dir, text, tmp_path,
                                                                         monkeypatch):
    import llmprune.sweeps as sweep

    real = sweep.compress_model
    calls: list[str] = []

    def counting(model, tok, recipe, *a, **k):
        calls.append(recipe.label)
        if len(calls) == 2 and stop[0]:
            raise KeyboardInterrupt  # killed while the second cell runs
        return real(model, tok, recipe, *a, **k)

    stop = [True]
    monkeypatch.setattr(sweep, "compress_model", counting)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_model_dir, tmp_path / "s", text)
    assert len(list((tmp_path / "s" / "cells").glob("*.json"))) == 2  # the dense model and the first cell
    assert not (tmp_path / "s" / "results.csv").exists()
    stop[0] = False
    calls.clear()
    first = run_sweep(tiny_model_dir, tmp_path / "s", text)
    assert len(calls) == 3  # only the three cells not finished
    calls.clear()
    again = run_sweep(tiny_model_dir, tmp_path / "s", text, sparsities="0.5,0.7,2:4")
    assert calls == ["sparsegpt 0.7", "magnitude 0.7"]
    by_label = {r["label"]: r for r in again}
    for r in first:
        assert by_label[r["label"]]["ppl"] == r["ppl"]


def test_bad_sweep_input_is_one_line(tiny_model_dir, text, tmp_path, capsys):
    def run(*args) -> tuple[int, list[str]]:
        with pytest.raises(SystemExit) as exc:
            main(["sweep", str(tiny_model_dir), "--out", str(tmp_path / "o"), *map(str, args)])
        return exc.value.code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]

    code, err = run("--methods", "sparsegpt", "--sparsities", "0.5,abc", "--calib", text)
    assert code == 2 and len(err) == 1 and "abc" in err[0]
    code, err = run("--methods", "rtn", "--sparsities", "0.5", "--calib", text, "--eval", text)
    assert code == 2 and "rtn 0.5" in err[0] and "--wbits" in err[0]
    code, err = run("--methods", "sparsegpt", "--sparsities", "0.5", "--method", "wanda")
    assert code == 2 and len(err) == 1
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("methods: [sparsegpt]\nsparsity: [0.5]\n")
    code, err = run("--config", cfg)
    assert code == 2 and "sparsity" in err[0]
    assert not (tmp_path / "o").exists()


def test_yaml_grid(tiny_model_dir, text, tmp_path, capsys):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(f"methods: [wanda]\nsparsities: [0.5, '2:4']\neval: ['{text}']\n"
                   f"recipe: {{calib: '{text}', nsamples: 4, seqlen: 32, device: cpu}}\n")
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(tiny_model_dir), "--out", str(tmp_path / "g"), "--config", str(cfg), "--max-windows", "2"])
    assert exc.value.code == 0
    rows = json.loads((tmp_path / "g" / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "wanda 0.5", "wanda 2:4"]
    assert "| wanda | 2:4 |" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval is an optional extra (pip install 'llmprune[lmeval]'): not installed here")
def test_zero_shot_tasks_through_lm_eval(tiny_model_dir, text, tmp_path):
    with pytest.raises(llmprune.UsageError, match="no-such-task"):
        llmprune.sweep(tiny_model_dir, tmp_path / "t", methods="magnitude", sparsities="0.5", evals=str(text),
                           calib=str(text), tasks="no-such-task", max_windows=2, progress=False, **CALIB)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval is an optional extra (pip install 'llmprune[lmeval]'): not installed here")
def test_a_task_from_a_local_file_scores_every_cell(tiny_model_dir, text, tmp_path, capsys):
    """lm-eval for real: a multiple-choice task defined by a YAML file over a local JSON file, no network; every
    row (dense included) gets its accuracy, in results.json and the table."""
    questions = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "answer": 0}
                 for a in range(4) for b in range(3)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    task = tmp_path / "tasks" / "sums.yaml"
    task.parent.mkdir()
    task.write_text(f"""task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(tiny_model_dir), "--out", str(tmp_path / "t"), "--methods", "magnitude", "--sparsities",
              "0.5", "--calib", str(text), "--eval", str(text), "--max-windows", "2", "--tasks", str(task),
              "--nsamples", "4", "--seqlen", "32", "--device", "cpu"])
    assert exc.value.code == 0
    rows = json.loads((tmp_path / "t" / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "magnitude 0.5"]
    for r in rows:
        assert 0 <= r["scores"]["tiny_sums"] <= 1, r
    assert "acc tiny_sums" in capsys.readouterr().out


def test_a_task_file_that_is_missing_or_names_no_task_is_refused(tiny_model_dir, text, tmp_path):
    from llmprune.sweeps import task_name

    assert task_name("hellaswag") == "hellaswag"
    with pytest.raises(llmprune.UsageError, match="does not exist"):
        task_name(str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(llmprune.UsageError, match="names no task"):
        task_name(str(tmp_path / "bad.yaml"))


def test_without_lm_eval_tasks_say_how_to_get_it(tiny_model_dir, text, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(llmprune.UsageError, match="lm-eval"):
        llmprune.sweep(tiny_model_dir, tmp_path / "t", methods="magnitude", sparsities="0.5", evals=str(text),
                           calib=str(text), tasks="hellaswag", progress=False, **CALIB)
    assert not (tmp_path / "t").exists()


def test_close_n_m_points_get_labels_that_do_not_overlap():
    """Three methods' 2:4 cells within 2% of each other: their labels in the plot are kept apart."""
    from llmprune.sweeps import figure

    rows = [{"method": "dense", "sparsity": "0", "wbits": None, "ppl": {"wikitext2": 20.0}}]
    for method, ppl in (("admm", 29.8), ("sparsegpt", 30.0), ("wanda", 30.3), ("magnitude", 60.0)):
        rows.append({"method": method, "sparsity": "0.5", "wbits": None, "ppl": {"wikitext2": 0.8 * ppl}})
        rows.append({"method": method, "sparsity": "2:4", "wbits": None, "ppl": {"wikitext2": ppl}})
    fig = figure(rows, ["wikitext2"], "close values")
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text() == "2:4"]
    assert len(labels) == 4
    points = [ax.transData.transform(t.xy) for t in labels]
    assert sorted(abs(a[1] - b[1]) for a in points for b in points if a is not b)[0] < 5  # they would collide
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, not the line to its point
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    import matplotlib.pyplot as plt

    plt.close(fig)
