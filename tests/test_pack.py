"""Packed 2:4 checkpoints: the pack24 kernel and its torch twin, pack -> load/unpack exact, sizes, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from llmprune.cli import main
from llmprune.data import builtin_text_path
from llmprune.kernels.pack24 import check24, pack24, pack24_torch, unpack24, unpack24_torch


def random_24(rows: int, cols: int, dtype=torch.float32, extra_zeros: float = 0.2) -> torch.Tensor:
    """A random 2:4 matrix, some groups with fewer than 2 nonzeros (and -0.0 entries)."""
    W = torch.randn(rows, cols)
    keep = torch.rand(rows, cols // 4, 4).argsort(-1) < 2
    W = (W.reshape(rows, -1, 4) * keep).reshape(rows, cols)  # pruned negatives become -0.0
    W[torch.rand(rows, cols) < extra_zeros] = 0
    return W.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (5, 12), (37, 100), (17, 260)])  # odd groups, rows not tile multiples
def test_pack24_kernel_matches_torch_and_round_trips(shape, dtype):
    W = random_24(*shape, dtype)
    v, m = pack24_torch(W)
    vk, mk = pack24(W)
    assert torch.equal(v, vk) and torch.equal(m, mk)
    assert v.shape == (shape[0], shape[1] // 2) and m.shape == (shape[0], (shape[1] // 4 + 1) // 2)
    assert torch.equal(unpack24_torch(v, m, shape[1]), W)
    assert torch.equal(unpack24(vk, mk, shape[1]), W)


def test_pack24_layout_by_hand():
    v, m = pack24_torch(torch.tensor([[0.0, 5, 0, 7, 3, 0, 0, 0]]))
    assert v.tolist() == [[5, 7, 3, 0]] and m.tolist() == [[1 | 3 << 2 | (0 | 1 << 2) << 4]]


def test_non_24_input_is_rejected_naming_the_first_bad_row():
    W = random_24(6, 16)
    W[3, 8:11] = 1.0
    W[5, 0:4] = 1.0
    for fn in (check24, pack24, pack24_torch):
        with pytest.raises(ValueError, match="row 3 breaks 2:4 \\(columns 8..11"):
            fn(W)


def run(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # only this command's output
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(builtin_text_path().read_text()[:60_000])
    return p


def compressed(model_dir, out, calib, *extra) -> Path:
    code = main_code(["compress", model_dir, "--out", out, "--calib", calib, "--nsamples", 4, "--seqlen", 32,
                      "--device", "cpu", *extra])
    assert code == 0
    return Path(out)


def error_lines(err: str) -> list[str]:
    """stderr without progress bars."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "/s]" not in ln]


def main_code(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def dense_weights(directory: Path) -> dict[str, torch.Tensor]:
    from llmprune import load

    model, _ = load(directory)
    return {k: v.clone() for k, v in model.state_dict().items()}


def linear_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of the packed layers' tensors in the files, dense fp16 bytes of those layers) from the files."""
    manifest = json.loads((directory / "llmprune-pack.json").read_text())
    tensors = {}
    for f in directory.glob("packed24*.safetensors"):
        tensors.update(load_file(f))
    packed = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rsplit(".", 1)[0] in
                 manifest["layers"])
    fp16 = sum(2 * info["shape"][0] * info["shape"][1] for info in manifest["layers"].values())
    return packed, fp16


@pytest.mark.parametrize("extra,bound", [((), 0.57), (("--wbits", "4"), 0.21)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pack_then_load_is_exact_and_small(tiny_model_dir, calib, tmp_path, capsys, extra, bound, dtype):
    src = compressed(tiny_model_dir, tmp_path / "c", calib, "--pattern", "2:4", "--dtype", dtype, *extra)
    before = dense_weights(src)
    code, out, err = run(["pack", src, "--pattern", "2:4", "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    packed = tmp_path / "p"
    after = dense_weights(packed)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    got, fp16 = linear_bytes(packed)
    assert got <= bound * fp16
    # the model's forward is unchanged, and eval-ppl/compress accept the packed directory
    from llmprune import load
    from llmprune.errors import UsageError
    from llmprune.loading import load_model

    m1, tok = load(src)
    m2, _ = load(packed)
    with pytest.raises(UsageError, match="packed 2:4"):  # transformers alone would leave its linears random
        load_model(str(packed))
    ids = torch.randint(0, 300, (2, 16))
    assert torch.equal(m1(ids).logits, m2(ids).logits)
    code, out, err = run(["unpack", packed, "--out", tmp_path / "u"], capsys)
    assert code == 0, err
    unpacked = dense_weights(tmp_path / "u")
    assert all(torch.equal(before[k], unpacked[k]) for k in before)
    # unpack keeps the grids, so the unpacked directory packs again to the same files
    code, _, err = run(["pack", tmp_path / "u", "--pattern", "2:4", "--out", tmp_path / "p2"], capsys)
    assert code == 0, err
    for f in packed.glob("packed24*.safetensors"):
        a, b = load_file(f), load_file(tmp_path / "p2" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pack_reads_compressed_tensors_and_inspect_reports_sizes(tiny_model_dir, calib, tmp_path, capsys):
    src = compressed(tiny_model_dir, tmp_path / "c", calib, "--pattern", "2:4", "--wbits", "4", "--dtype",
                     "float16", "--format", "compressed-tensors")
    code, _, err = run(["pack", src, "--pattern", "2:4", "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    code, out, _ = run(["inspect", tmp_path / "p", "--json"], capsys)
    info = json.loads(out.strip().splitlines()[-1])
    assert info["layout"] == "packed 2:4"
    assert all(r["pattern"] == "2:4" and r["format"] == "2:4 packed int4" for r in info["layers"])
    assert len(info["layers"]) == 14 and abs(info["total"]["sparsity"] - 0.5) < 0.01
    assert info["total"]["bytes"] <= 0.21 * info["total"]["fp16_bytes"]
    code, out, _ = run(["inspect", src], capsys)
    assert code == 0 and "pack-quantized int4" in out and "total (14 linears)" in out


def test_inspect_shows_per_layer_sparsities_of_an_allocation(tiny_model_dir, calib, tmp_path, capsys):
    src = compressed(tiny_model_dir, tmp_path / "c", calib, "--sparsity", "0.6", "--allocation", "owl",
                     "--owl-lambda", "0.1")
    report = json.loads((src / "llmprune.json").read_text())
    code, out, _ = run(["inspect", src, "--json"], capsys)
    info = json.loads(out.strip().splitlines()[-1])
    assert info["allocation"] == "owl"
    chosen = report["allocation"]["sparsities"]
    for r in info["layers"]:
        assert abs(r["sparsity"] - chosen[r["name"]]) < 1e-3, r["name"]
    assert abs(info["total"]["sparsity"] - 0.6) < 1e-3


def test_a_layer_breaking_24_is_refused_by_name_or_kept_dense(tiny_model_dir, calib, tmp_path, capsys):
    src = compressed(tiny_model_dir, tmp_path / "c", calib, "--pattern", "2:4")
    name = "model.layers.1.mlp.up_proj"
    index = src / "model.safetensors.index.json"  # a small model's output is one file
    shard = src / json.loads(index.read_text())["weight_map"][f"{name}.weight"] if index.exists() else \
        src / "model.safetensors"
    tensors = load_file(shard)
    tensors[f"{name}.weight"][7, 4:8] = 1.0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, out, err = run(["pack", src, "--pattern", "2:4", "--out", tmp_path / "p"], capsys)
    assert code == 2 and f"{name}: row 7 breaks 2:4" in err and "--skip-nonconforming" in err
    assert len(error_lines(err)) == 1 and not (tmp_path / "p").exists()
    code, out, err = run(["pack", src, "--pattern", "2:4", "--out", tmp_path / "p", "--skip-nonconforming"], capsys)
    assert code == 0 and name in out
    after = dense_weights(tmp_path / "p")
    assert torch.equal(after[f"{name}.weight"], tensors[f"{name}.weight"])


def test_48_layers_are_packed_when_also_24_else_refused(tiny_model_dir, calib, tmp_path, capsys):
    src = compressed(tiny_model_dir, tmp_path / "c", calib, "--pattern", "4:8")
    code, _, err = run(["pack", src, "--pattern", "4:8", "--out", tmp_path / "p"], capsys)
    assert code == 2 and "holds 4:8, but the packed format stores 2:4 only" in err
    src24 = compressed(tiny_model_dir, tmp_path / "c24", calib, "--pattern", "2:4")
    code, _, err = run(["pack", src24, "--pattern", "4:8", "--out", tmp_path / "p"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("case", ["bad-pattern", "unstructured", "not-a-dir", "already-packed", "unpack-dense"])
def test_pack_bad_input_is_one_line_exit_2(case, tiny_model_dir, calib, tmp_path, capsys):
    src = tmp_path / "c"
    if case in ("unstructured", "already-packed", "unpack-dense"):
        src = compressed(tiny_model_dir, src, calib, *(["--pattern", "2:4"] if case != "unstructured" else []))
    args = {
        "bad-pattern": ["pack", tiny_model_dir, "--pattern", "1:4", "--out", tmp_path / "p"],
        "unstructured": ["pack", src, "--pattern", "2:4", "--out", tmp_path / "p"],
        "not-a-dir": ["pack", tmp_path / "nothing", "--pattern", "2:4", "--out", tmp_path / "p"],
        "already-packed": ["pack", src, "--pattern", "2:4", "--out", tmp_path / "p"],
        "unpack-dense": ["unpack", src, "--out", tmp_path / "p"],
    }[case]
    if case == "already-packed":
        assert main_code(args) == 0
        args = ["pack", tmp_path / "p", "--pattern", "2:4", "--out", tmp_path / "p3"]
    code, out, err = run(args, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert not (tmp_path / ("p3" if case == "already-packed" else "p")).exists()


def test_gpt2_conv1d_layers_pack_transposed(tmp_path, tiny_tokenizer, calib, capsys):
    d = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    src = compressed(d, tmp_path / "c", calib, "--pattern", "2:4")
    before = dense_weights(src)
    assert main_code(["pack", src, "--pattern", "2:4", "--out", tmp_path / "p"]) == 0
    after = dense_weights(tmp_path / "p")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_semi_structured_needs_a_cuda_gpu(tiny_model_dir, calib, tmp_path):
    from llmprune import load
    from llmprune.errors import UsageError

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    src = compressed(tiny_model_dir, tmp_path / "c", calib, "--pattern", "2:4")
    assert main_code(["pack", src, "--pattern", "2:4", "--out", tmp_path / "p"]) == 0
    with pytest.raises(UsageError, match="CUDA"):
        load(tmp_path / "p", semi_structured=True)
