"""Float grids (FP8 E4M3, NVFP4, MXFP4) and llm-compressor's scheme names: the grids' values, GPTQ and joint
sparsity on them, and their compressed-tensors checkpoints against the real compressed-tensors package and
transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import compress_args, run
from test_solvers import correlated_layer

from llmprune.checkpoint import ct_format, pack_quantized, unpack_fp4, weights_args
from llmprune.quant import E2M1, QuantSpec, codes, global_scale, layer_params, on_grid, round_e2m1, round_e4m3, rtn
from llmprune.recipe import Recipe
from llmprune.schemes import SCHEMES
from llmprune.solvers import sparsegpt
from llmprune.solvers.result import relative_error

ct = pytest.importorskip("compressed_tensors")

FLOAT_SPECS = {
    "fp8-channel": QuantSpec(8, -1, grid="fp8"),
    "fp8-tensor": QuantSpec(8, 0, grid="fp8"),
    "nvfp4": QuantSpec(4, 16, grid="nvfp4"),
    "mxfp4": QuantSpec(4, 32, grid="mxfp4"),
}


def test_every_fp8_code_round_trips_and_e2m1_has_its_eight_magnitudes():
    fp8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = fp8[~fp8.isnan()]
    assert len(finite) == 254 and torch.equal(round_e4m3(finite), finite + 0.0)
    assert round_e4m3(torch.tensor([1e4, -1e4])).tolist() == [448.0, -448.0]  # saturates, no NaN
    x = torch.linspace(-8, 8, 4001)
    values = set(round_e2m1(x).tolist())
    assert values == {s * m for m in E2M1 for s in (1.0, -1.0)}
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    assert torch.equal(round_e2m1(x), cast_to_fp4(x.clamp(-6, 6).clone()) + 0.0)  # their rounding, ties included
    assert not torch.signbit(round_e2m1(torch.tensor([-0.1, -0.0]))).any()  # zeros are +0


def test_mxfp4_scales_are_powers_of_two_as_compressed_tensors_chooses_them():
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    W = torch.randn(16, 64) * torch.exp(torch.randn(16, 1) * 3)
    p = layer_params(W, FLOAT_SPECS["mxfp4"])
    log2 = torch.log2(p.scale)
    assert torch.equal(log2, log2.round())
    amax = W.abs().reshape(16, 2, 32).amax(-1)
    assert torch.equal(p.scale, torch.exp2(generate_mx_scales(amax) - 127))  # their E8M0 exponents


@pytest.mark.parametrize("name", list(FLOAT_SPECS))
def test_gptq_on_a_float_grid_beats_round_to_nearest_and_joint_50_keeps_exact_zeros(name):
    spec = FLOAT_SPECS[name]
    W, H = correlated_layer(32, 128)
    W = W.bfloat16()
    Wr, pr = rtn(W, spec)
    g = sparsegpt(W, H, 0.0, None, spec, block_size=64)
    assert on_grid(Wr, pr) and on_grid(g.weight, g.quant)
    assert relative_error(W, g.weight, H) < 0.8 * relative_error(W, Wr, H)
    j = sparsegpt(W, H, 0.5, None, spec, block_size=64, act_order=True)
    assert on_grid(j.weight, j.quant)
    assert int(j.mask.sum()) == W.numel() // 2 and torch.all(j.weight[j.mask] == 0)
    assert not torch.signbit(j.weight[j.weight == 0]).any()
    if spec.grid != "fp8":
        assert set(codes(j.weight, j.quant).abs().unique().tolist()) <= set(E2M1)


def test_nvfp4_scales_are_fp8_over_the_global_scale():
    W = torch.randn(8, 64)
    p = layer_params(W, FLOAT_SPECS["nvfp4"])
    gs = global_scale(W, FLOAT_SPECS["nvfp4"])
    assert torch.equal(p.global_scale, gs) and gs.item() == pytest.approx(448 * 6 / W.abs().max().item())
    local = p.scale * gs
    assert torch.equal(local.to(torch.float8_e4m3fn).float() / gs, p.scale)
    assert local.max().item() == pytest.approx(448, rel=0.07)  # the largest group uses FP8's range


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_each_scheme_is_compressed_tensors_preset_and_format(name):
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme

    theirs = preset_name_to_scheme(name, ["Linear"])
    r = Recipe(scheme=name)
    ours = QuantizationArgs.model_validate(weights_args(r.quant)).model_dump(mode="json")
    assert ours | {"observer": None} == theirs.weights.model_dump(mode="json") | {"observer": None}  # as written
    act = r.activations
    assert (act is None) == (theirs.input_activations is None)
    if act is not None:  # the entry as compressed-tensors writes it into config.json
        assert act.config() == theirs.input_activations.model_dump(mode="json")
    assert ct_format(r.quant, act) == infer_module_format(torch.nn.Linear, theirs).value


@pytest.mark.parametrize("name", ["FP8_DYNAMIC", "NVFP4A16", "MXFP4A16", "W8A8", "W4AFP8"])
def test_packed_tensors_equal_compressed_tensors_compressor_bit_for_bit(name):
    """The same codes and scales through the real compressor: every tensor equal, in dtype and shape."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    r = Recipe(scheme=name)
    W, H = correlated_layer(32, 128)
    res = sparsegpt(W.bfloat16(), H, 0.5, None, r.quant, block_size=64)
    ours = pack_quantized("x", res.weight, res.quant, r.activations)
    scheme = preset_name_to_scheme(name, ["Linear"])
    # the weights in fp32 (the same values): in bf16 their quantize divides in bf16, which rounds an int8 code
    # of 128 or more by one
    local = {"weight": res.weight.float(), "weight_scale": res.quant.scale.to(res.weight.dtype)}
    if r.quant.grid == "nvfp4":
        local["weight_scale"] = res.quant.scale * res.quant.global_scale  # the FP8 values, before their cast
        local["weight_global_scale"] = res.quant.global_scale
    compressor = BaseCompressor.get_value_from_registry(ct_format(r.quant, r.activations))
    theirs = {f"x.{k}": v for k, v in compressor.compress(local, scheme).items()}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), theirs[k].reshape(-1).view(torch.uint8)), k
    back = compressor.decompress({k.removeprefix("x."): v for k, v in ours.items()}, scheme)["weight"]
    assert torch.equal(back.to(res.weight.dtype), res.weight)
    if r.quant.grid in ("nvfp4", "mxfp4"):
        assert set(unpack_fp4(ours["x.weight_packed"]).abs().unique().tolist()) <= set(E2M1)


@pytest.fixture
def calib(tmp_path):
    from llmprune.data import builtin_text_path

    p = tmp_path / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


WEIGHT_ONLY = {
    "nvfp4-joint-50": ["--scheme", "NVFP4A16", "--sparsity", "0.5"],
    "mxfp4-gptq": ["--grid", "mxfp4"],
    "fp8-channel-act-order": ["--grid", "fp8", "--act-order"],
    "fp8-tensor": ["--grid", "fp8", "--group-size", "0"],
    "nvfp4-reconstruct": ["--grid", "nvfp4", "--sparsity", "0.5", "--reconstruct", "2"],  # stays on its grid
}


@pytest.mark.parametrize("case", list(WEIGHT_ONLY))
def test_transformers_loads_float_checkpoints_with_our_logits(case, tiny_model_dir, calib, tmp_path, capsys):
    """Weight-only float schemes: transformers decompresses them on CPU to exactly our fake-quantized weights."""
    from transformers import AutoModelForCausalLM

    outs = {}
    for fmt in ("dense", "compressed-tensors"):
        outs[fmt] = tmp_path / fmt
        code, _, err = run(compress_args(tiny_model_dir, outs[fmt], calib, "--format", fmt, *WEIGHT_ONLY[case]), capsys)
        assert code == 0, err
    qc = json.loads((outs["compressed-tensors"] / "config.json").read_text())["quantization_config"]
    assert "sparsity_config" not in qc
    a = AutoModelForCausalLM.from_pretrained(outs["dense"])
    b = AutoModelForCausalLM.from_pretrained(outs["compressed-tensors"])
    ids = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    report = json.loads((outs["compressed-tensors"] / "llmprune.json").read_text())
    numel = sum(r["shape"][0] * r["shape"][1] for r in report["layers"])
    assert report["checkpoint"]["bits_per_weight"] == pytest.approx(
        sum(r["bits"] * r["shape"][0] * r["shape"][1] for r in report["layers"]) / numel)


def test_streamed_nvfp4_equals_the_in_memory_run(tiny_model_dir, calib, tmp_path, capsys):
    flags = ["--format", "compressed-tensors", "--scheme", "NVFP4A16", "--sparsity", "0.5"]
    for d, extra in (("lazy", []), ("whole", ["--no-lazy"])):
        code, _, err = run(compress_args(tiny_model_dir, tmp_path / d, calib, *flags, *extra), capsys)
        assert code == 0, err
    a, b = _tensors(tmp_path / "lazy"), _tensors(tmp_path / "whole")
    assert sum(k.endswith(".weight_global_scale") for k in a) == 14
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "lazy" / "config.json").read_bytes() == (tmp_path / "whole" / "config.json").read_bytes()


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W8A8", "MXFP4"])
def test_activation_schemes_our_fake_quant_is_what_transformers_runs(scheme, tiny_model_dir, calib, tmp_path, capsys):
    """Dynamic activation quantization declared in the config: transformers quantizes the inputs at run time,
    and llmprune's dense output with ``quantize_inputs`` (what eval-ppl applies) gives the same logits and
    perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.quant import quantize_inputs
    from llmprune.schemes import activations

    outs = {}
    for fmt in ("dense", "compressed-tensors"):
        outs[fmt] = tmp_path / fmt
        code, _, err = run(compress_args(tiny_model_dir, outs[fmt], calib, "--format", fmt, "--scheme", scheme), capsys)
        assert code == 0, err
    qc = json.loads((outs["compressed-tensors"] / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is True and "sparsity_config" not in qc
    a = AutoModelForCausalLM.from_pretrained(outs["dense"])
    b = AutoModelForCausalLM.from_pretrained(outs["compressed-tensors"])
    ids = torch.randint(0, a.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    report = json.loads((outs["dense"] / "llmprune.json").read_text())
    with torch.no_grad():
        plain = a(ids).logits
        hooks = quantize_inputs(a, [layer["name"] for layer in report["layers"]], activations(scheme))
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert not torch.equal(plain, b(ids).logits)  # the activations' rounding shows
    for h in hooks:
        h.remove()
    code, stdout, err = run(["eval-ppl", outs["dense"], "--dataset", calib, "--seqlen", 32, "--max-windows", 2,
                             "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    from llmprune.perplexity import evaluation_windows, perplexity

    windows, _ = evaluation_windows(AutoTokenizer.from_pretrained(outs["dense"]), b, str(calib), 32, 2)
    assert json.loads(stdout)["ppl"] == perplexity(b, windows, torch.device("cpu"), progress=False)
