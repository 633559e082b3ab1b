"""The command line: the happy path on a tiny model directory, and every bad input refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from llmprune.cli import main
from llmprune.data import builtin_text_path


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def calib_txt(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


def compress_args(model_dir, out, calib, *extra):
    return ["compress", model_dir, "--out", out, "--calib", calib, "--nsamples", 4, "--seqlen", 32,
            "--device", "cpu", *extra]


def test_compress_writes_a_loadable_model_and_report(tiny_model_dir, calib_txt, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    code, stdout, _ = run(compress_args(tiny_model_dir, out, calib_txt, "--pattern", "2:4"), capsys)
    assert code == 0, stdout
    assert "50.00% sparsity" in stdout and str(out) in stdout
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()} == before  # input untouched
    report = json.loads((out / "llmprune.json").read_text())
    assert report["recipe"]["pattern"] == "2:4" and report["calibration"]["nsamples"] == 4
    assert len(report["calibration"]["sha256"]) == 16 and "total_s" in report["timings"]
    assert all(0 <= layer["rel_error"] < 1 for layer in report["layers"])
    model = AutoModelForCausalLM.from_pretrained(out)
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.all((down != 0).reshape(down.shape[0], -1, 4).sum(-1) <= 2)
    assert not list(tmp_path.glob(".pruned.partial*"))

    code, stdout, _ = run(["eval-ppl", out, "--dataset", calib_txt, "--seqlen", 32, "--max-windows", 3,
                           "--device", "cpu", "--json"], capsys)
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["ppl"] > 1


def test_searched_allocations_say_what_they_found(tiny_model_dir, calib_txt, tmp_path, capsys):
    from llmprune.allocate import OWL_AUTO

    out = tmp_path / "owl"
    code, stdout, _ = run(compress_args(tiny_model_dir, out, calib_txt, "--sparsity", "0.6", "--allocation", "owl",
                                        "--owl-lambda", "auto", "--owl-m", "2"), capsys)
    assert code == 0, stdout
    alloc = json.loads((out / "llmprune.json").read_text())["allocation"]
    assert alloc["owl_lambda"] in OWL_AUTO and [c["owl_lambda"] for c in alloc["lambda_search"]] == list(OWL_AUTO)
    assert f"owl lambda {alloc['owl_lambda']:g}, the lowest calibration loss" in stdout

    out = tmp_path / "spdy"
    code, stdout, _ = run(compress_args(tiny_model_dir, out, calib_txt, "--sparsity", "0.6", "--allocation", "spdy",
                                        "--spdy-steps", "2", "--spdy-samples", "4"), capsys)
    assert code == 0, stdout
    alloc = json.loads((out / "llmprune.json").read_text())["allocation"]
    assert f"spdy allocation: calibration loss {alloc['loss']:.4f} (uniform " in stdout


def test_config_file_and_flag_override(tiny_model_dir, calib_txt, tmp_path, capsys):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("method: wanda\nsparsity: 0.6\nnsamples: 2\n")
    out = tmp_path / "o"
    code, _, err = run(compress_args(tiny_model_dir, out, calib_txt, "--config", cfg, "--sparsity", 0.25), capsys)
    assert code == 0, err
    recipe = json.loads((out / "llmprune.json").read_text())["recipe"]
    assert recipe["method"] == "wanda" and recipe["sparsity"] == 0.25 and recipe["nsamples"] == 4


@pytest.fixture
def gpt2_model_dir(tmp_path, tiny_tokenizer) -> Path:
    d = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def odd_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A tiny llama whose MLP width (100) is not a multiple of 8."""
    model = tiny_model("llama")
    model.config.intermediate_size = 100
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model.config)
    d = tmp_path / "odd"
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


BAD = {
    "unknown model path": (["compress", "./no/such/model", "--out", "{tmp}/o"], "does not exist"),
    "unknown hub id": (["compress", "nobody/no-such-model-xyz", "--out", "{tmp}/o", "--calib", "{calib}"],
                       "cannot load model"),
    "sparsity 1.0": (["compress", "{model}", "--out", "{tmp}/o", "--sparsity", "1.0"], "outside [0, 1)"),
    "negative sparsity": (["compress", "{model}", "--out", "{tmp}/o", "--sparsity", "-0.1"], "outside [0, 1)"),
    "malformed pattern": (["compress", "{model}", "--out", "{tmp}/o", "--pattern", "2-4"], "malformed pattern"),
    "inverted pattern": (["compress", "{model}", "--out", "{tmp}/o", "--pattern", "4:2"], "malformed pattern"),
    "sparsity contradicts pattern": (["compress", "{model}", "--out", "{tmp}/o", "--pattern", "2:4",
                                      "--sparsity", "0.7"], "contradicts"),
    "pattern the layer cannot hold": (["compress", "{odd}", "--out", "{tmp}/o", "--pattern", "4:8",
                                       "--calib", "{calib}"], "mlp.down_proj has 100 inputs"),
    "out not empty": (["compress", "{model}", "--out", "{full}"], "not empty"),
    "out is the input": (["compress", "{model}", "--out", "{model}", "--overwrite"], "is the input"),
    "calibration too short": (["compress", "{model}", "--out", "{tmp}/o", "--calib", "{short}"],
                              "shorter than one window"),
    "dataset offline": (["compress", "{model}", "--out", "{tmp}/o", "--calib", "wikitext2"], "local .txt"),
    "unknown dataset": (["eval-ppl", "{model}", "--dataset", "nosuchset"], "unknown dataset"),
    "unknown config key": (["compress", "{model}", "--out", "{tmp}/o", "--config", "{badcfg}"], "unknown key"),
    "bad flag value": (["compress", "{model}", "--out", "{tmp}/o", "--sparsity", "abc"], "abc"),
    "wbits too high": (["compress", "{model}", "--out", "{tmp}/o", "--wbits", "9"], "outside 2..8"),
    "wbits too low": (["compress", "{model}", "--out", "{tmp}/o", "--wbits", "1"], "outside 2..8"),
    "group size the layer cannot hold": (["compress", "{model}", "--out", "{tmp}/o", "--wbits", "4", "--group-size",
                                          "256", "--calib", "{calib}"], "does not divide the 64 inputs of layer"),
    "group size across blocks": (["compress", "{model}", "--out", "{tmp}/o", "--wbits", "4", "--group-size", "48"],
                                 "one must be a multiple of the other"),
    "compressed-tensors without bits": (["compress", "{model}", "--out", "{tmp}/o", "--format",
                                         "compressed-tensors"], "add --wbits"),
    "act-order with N:M": (["compress", "{model}", "--out", "{tmp}/o", "--wbits", "4", "--pattern", "2:4",
                            "--act-order"], "breaks the 2:4 pattern"),
    "act-order with wanda": (["compress", "{model}", "--out", "{tmp}/o", "--wbits", "4", "--method", "wanda",
                              "--act-order"], "--method wanda has none"),
    "act-order without bits": (["compress", "{model}", "--out", "{tmp}/o", "--act-order"], "add --wbits"),
    "rtn without bits": (["compress", "{model}", "--out", "{tmp}/o", "--method", "rtn"], "add --wbits"),
    "nothing to do": (["compress", "{model}", "--out", "{tmp}/o", "--sparsity", "0"], "nothing to do"),
    "allocation with N:M": (["compress", "{model}", "--out", "{tmp}/o", "--allocation", "owl", "--pattern", "2:4"],
                            "varies the sparsity per layer"),
    "spdy radius": (["compress", "{model}", "--out", "{tmp}/o", "--allocation", "spdy", "--spdy-radius", "0.7"],
                  "spdy_radius 0.7 must be in (0, 0.5]"),
    "unknown kernels in a recipe": (["compress", "{model}", "--out", "{tmp}/o", "--config", "{kernelscfg}"],
                                    "unknown kernels 'fast'"),
    "reuse-errors without spdy": (["compress", "{model}", "--out", "{tmp}/o", "--reuse-errors", "{badcfg}"],
                                  "add --allocation spdy"),
    "owl lambda word": (["compress", "{model}", "--out", "{tmp}/o", "--allocation", "owl", "--owl-lambda", "big"],
                        "neither a number nor auto"),
    "owl lambda range": (["compress", "{model}", "--out", "{tmp}/o", "--allocation", "owl", "--owl-lambda", "0.7"],
                         "must be in (0, 0.5) or auto"),
    "unknown allocation": (["compress", "{model}", "--out", "{tmp}/o", "--allocation", "dp"], "'dp' is not one of"),
    "reuse-errors without tables": (["compress", "{model}", "--out", "{tmp}/o", "--allocation", "spdy",
                                     "--reuse-errors", "{badcfg}"], "is not a readable run report"),
    "compressed-tensors of Conv1D": (["compress", "{gpt2}", "--out", "{tmp}/o", "--wbits", "4", "--format",
                                      "compressed-tensors", "--calib", "{calib}"], "use --format dense"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_model_dir, odd_model_dir, gpt2_model_dir,
                                                          calib_txt, tmp_path, capsys):
    args, message = BAD[case]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "bad.yaml").write_text("sparsty: 0.5\n")
    (tmp_path / "kernels.yaml").write_text("kernels: fast\n")
    model_copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_copy)
    subst = {"{tmp}": str(tmp_path), "{model}": str(model_copy), "{odd}": str(odd_model_dir),
             "{gpt2}": str(gpt2_model_dir),
             "{calib}": str(calib_txt), "{full}": str(tmp_path / "full"), "{short}": str(tmp_path / "short.txt"),
             "{badcfg}": str(tmp_path / "bad.yaml"), "{kernelscfg}": str(tmp_path / "kernels.yaml")}
    for i, a in enumerate(args):
        for k, v in subst.items():
            a = a.replace(k, v)
        args[i] = a
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, _, err = run([*args, "--device", "cpu"] if args[0] == "compress" else args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # progress bars aside
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_strictly(path):
    from llmprune.recipe import load_recipe

    recipe = load_recipe(path)
    assert 0 <= recipe.target_sparsity < 1 and (recipe.target_sparsity > 0 or recipe.wbits is not None)
