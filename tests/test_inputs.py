"""Models as users bring them: already quantized inputs refused, --skip that matches nothing, linears left
dense listed with the reason."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_model

import llmprune
from llmprune.cli import main

SMALL = dict(calib="shakespeare", nsamples=4, seqlen=32, device="cpu", progress=False)


def one_line_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "/s]" not in ln]
    assert exc.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("qconfig,named", [({"quant_method": "gptq", "bits": 4}, "gptq"),
                                           ({"quant_method": "awq", "bits": 4}, "awq"),
                                           ({"quant_method": "fp8"}, "fp8"),
                                           ({"quant_method": "compressed-tensors", "format": "pack-quantized"},
                                            "compressed-tensors")])
def test_an_already_quantized_input_is_refused(tiny_model_dir, tmp_path, capsys, qconfig, named):
    d = tmp_path / "q"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (d / "config.json").write_text(json.dumps(cfg))
    err = one_line_error(["compress", d, "--out", tmp_path / "o", "--calib", "shakespeare"], capsys)
    assert "already quantized" in err and named in err and not (tmp_path / "o").exists()


def test_our_own_quantized_output_is_refused_as_input(tiny_model_dir, tmp_path, capsys):
    llmprune.compress(tiny_model_dir, tmp_path / "ct", wbits=4, group_size=32, format="compressed-tensors",
                      **SMALL)
    err = one_line_error(["compress", tmp_path / "ct", "--out", tmp_path / "o", "--calib", "shakespeare"], capsys)
    assert "already quantized" in err


def test_a_skip_regex_that_matches_nothing_is_an_error(tiny_model_dir, tmp_path, capsys):
    err = one_line_error(["compress", tiny_model_dir, "--out", tmp_path / "o", "--calib", "shakespeare",
                          "--skip", "mlp\\.down_projj$"], capsys)
    assert "matches no linear" in err and "down_projj" in err
    err = one_line_error(["compress", tiny_model_dir, "--out", tmp_path / "o", "--calib", "shakespeare",
                          "--skip", "."], capsys)
    assert "every linear is skipped" in err


def test_what_is_left_dense_is_listed_with_the_reason(tiny_model_dir, tmp_path, caplog):
    report = llmprune.compress(tiny_model_dir, tmp_path / "a", skip=[r"layers\.0\.mlp\.down_proj$"], **SMALL)
    assert report.left_dense == {"skipped": ["model.layers.0.mlp.down_proj"], "never_called": [], "routers": [],
                                 "unsupported_experts": []}
    assert len(report.layers) == 13


def test_magnitude_and_rtn_read_no_data_and_run_no_forward(tiny_model_dir, tmp_path, monkeypatch):
    """No calibration source is opened (a missing file would fail) and no block is ever called."""
    from llmprune import engine

    def no_forward(*a, **k):
        raise AssertionError("a data-free method ran a forward pass")

    monkeypatch.setattr(engine.Stream, "capture", no_forward)
    monkeypatch.setattr(engine.Stream, "forward_block", no_forward)
    for opts in (dict(method="magnitude", sparsity=0.5), dict(method="rtn", wbits=4, group_size=32)):
        for lazy in (True, False):
            out = tmp_path / f"{opts['method']}-{lazy}"
            report = llmprune.compress(tiny_model_dir, out, calib=str(tmp_path / "missing.txt"), lazy=lazy,
                                       device="cpu", progress=False, **opts).to_dict()
            assert "calibration" not in report or report["calibration"] is None
            assert all(r["tokens"] is None and r["rel_error"] is None for r in report["layers"])
            if opts["method"] == "magnitude":
                assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    model = tiny_model("llama")  # in memory, with no tokenizer anywhere
    report = llmprune.compress(model, method="magnitude", sparsity=0.5, device="cpu", progress=False)
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-3)
