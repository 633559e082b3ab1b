"""One compress pipeline for every model: where the model comes from (already in memory, loaded whole, or
streamed block by block from disk) and where its blocks go (the model in memory, written whole at the end;
or OUT.partial/'s journal, block by block as they finish, published when complete)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import distributed
from llmprune.arch import find_blocks
from llmprune.calibration import calibration_set
from llmprune.checkpoint import (
    OutputSpec,
    PackQuantizedWriter,
    atomic_dir,
    is_packed,
    read_report,
    save_compressed_tensors,
    save_hf,
    save_metadata,
    weights_bytes,
    write_report,
)
from llmprune.compression import RunSpec, compress_model
from llmprune.errors import UsageError
from llmprune.lazy import can_load_lazily, load_lazy, load_lazy_gguf
from llmprune.loading import ModelRef, bf16_pays, dtype_notice, is_gguf, load_model, resolve, skeleton
from llmprune.progress import Progress
from llmprune.report import Report
from llmprune.version import __version__

log = logging.getLogger("llmprune")


def versions() -> dict[str, str]:
    import transformers

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def describe(report: dict, model: nn.Module, source: str, kind: str, **extra: Any) -> torch.dtype:
    """Add the model and versions to the report; return the model's (materialised) dtype."""
    dtype = dtype_of(model)
    report["model"] = {"source": source, "kind": kind, "type": model.config.model_type,
                       "dtype": str(dtype).removeprefix("torch."), **extra}
    report["versions"] = versions()
    return dtype


def dtype_of(model: nn.Module) -> torch.dtype:
    """The model's working dtype: a lazy model's source's (every parameter may be on meta), else its first
    materialised parameter's."""
    lazy_source = getattr(model, "block_source", None)
    return (lazy_source.dtype if lazy_source is not None
            else next(p for p in model.parameters() if p.device.type != "meta").dtype)


def dense_checkpoint_info(directory: Path, dtype: torch.dtype) -> dict:
    """Size figures of a dense checkpoint: bits per weight of its linears as stored (pruned zeros take their
    full width in a dense file), as ``inspect`` and ``pack`` count them (dense fp16 = 16)."""
    return {"format": "dense", "dtype": str(dtype).removeprefix("torch."), "bits_per_weight": 8 * dtype.itemsize,
            "bytes": weights_bytes(directory)}


def save_whole(out: Path, model: nn.Module, tokenizer, report: dict, grids: dict, t_start: float,
          output: OutputSpec) -> None:
    """Complete the report (checkpoint size, save and total time) and publish ``out`` atomically."""
    dtype = next(p for p in model.parameters() if p.device.type != "meta").dtype
    t_save = time.perf_counter()
    with atomic_dir(out) as tmp:
        if output.compressed_tensors:
            report["checkpoint"] = save_compressed_tensors(model, tokenizer, tmp, report, grids,
                                                           act_order=output.act_order, act=output.activations)
            report["checkpoint"]["dtype"] = str(dtype).removeprefix("torch.")  # of its scales and dense tensors
        else:
            save_hf(model, tokenizer, tmp, report, grids=grids)
            report["checkpoint"] = dense_checkpoint_info(tmp, dtype)
        report["timings"]["save_s"] = round(time.perf_counter() - t_save, 3)
        report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        write_report(tmp, report)  # again, now with the checkpoint and the save time
    log.info("wrote %s", out)


def streams(mref: ModelRef) -> bool:
    """Whether the model is read block by block from disk: a plain safetensors directory, or a GGUF file whose
    tensors map one to one onto the model's (ggufio)."""
    if mref.kind == "dir":
        return can_load_lazily(Path(mref.location))
    if is_gguf(mref):
        from llmprune.ggufio import streamable

        return streamable(Path(mref.location) / mref.gguf_file)
    return False


def open_lazy(mref: ModelRef, dtype: str, read_on_main: bool = False, writes: bool = True):
    """(model streamed from disk, its tokenizer, the source's identity for the resume spec)."""
    path = Path(mref.location)
    if is_gguf(mref):
        file = path / mref.gguf_file
        model, tok = load_lazy_gguf(file, dtype, read_on_main=read_on_main, fp32_to_bf16=writes)
        st = file.stat()
        ident = hashlib.sha256(f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        return model, tok, {"model": str(file), "config": ident}
    model, tok = load_lazy(path, dtype, mref.trust_remote_code, read_on_main=read_on_main, fp32_to_bf16=writes)
    return model, tok, {"model": str(path), "config": hashlib.sha256((path / "config.json").read_bytes()).hexdigest()}


def say_not_streamed(mref: ModelRef, dtype: str, writes: bool) -> None:
    """Warn, with the host memory it will take, that this run loads the whole model instead of streaming."""
    if mref.kind == "gguf" or mref.kind == "builtin":
        why = "its GGUF architecture stores tensors transformers regroups (e.g. stacked experts) on load"
    elif mref.kind == "hub":
        why = "its hub weights are not safetensors, or not in the Hugging Face cache and not downloadable"
    elif is_packed(Path(mref.location)):
        why = "a packed 2:4 directory is unpacked whole"
    else:
        why = "the directory holds no safetensors weights (e.g. .bin files)"
    try:
        shape = skeleton(mref)
        dt = getattr(shape.config, "dtype", None) or getattr(shape.config, "torch_dtype", None)
        size = dt.itemsize if isinstance(dt, torch.dtype) and not is_gguf(mref) else 4
        # fp32 read as bf16: asked for, or by a command that writes where bf16 pays (loading.working_dtype)
        size = 2 if size == 4 and (dtype in ("bfloat16", "float16") or (dtype == "auto" and writes)) else size
        nbytes = sum(p.numel() for p in shape.parameters()) * size
        need = f"about {nbytes / 2**30:.1f} GiB of host memory"
    except UsageError:
        need = "the whole model in host memory"
    log.warning("%s is loaded whole, not streamed from disk (%s): %s", mref.ref, why, need)


def load_whole(mref: ModelRef, dtype: str, writes: bool = False):
    """(model, tokenizer) loaded whole into host memory; packed 2:4 directories unpacked. ``writes``: for a
    command that writes the model, so float32 weights load as bfloat16 unless ``dtype`` says otherwise."""
    if mref.kind == "dir" and is_packed(Path(mref.location)):
        from llmprune.pack import load as load_packed

        model, tokenizer = load_packed(mref.location, dtype=dtype)
        if writes and dtype == "auto" and model.dtype == torch.float32:
            model, tokenizer = load_packed(mref.location, dtype="bfloat16")
        return model, tokenizer
    model, tokenizer, _ = load_model(mref, dtype, fp32_to_bf16=writes)
    return model, tokenizer


def one_writer(out: Path | None):
    """OUT.partial/'s lock (the one a streamed run takes) held while a run computes and writes ``out`` in
    memory: a second run on the same output, streamed or not, is refused before it reads a weight."""
    if out is None:
        return contextlib.nullcontext()
    from llmprune.resume import partial_dir, sole_writer

    return sole_writer(partial_dir(out), f"--out {Path(out).expanduser().resolve()}")


_OPENED: list = []  # the PartialOutputs open in this process, innermost last (releases_partials closes them)


def open_partial(out: Path, spec: dict, total: int | None = None):
    """OUT.partial/ for this run's spec (resumed when a run with the same spec stopped), locked for this run:
    under torchrun rank 0 makes (or checks) and locks it for every rank, and the others, once it exists, only
    read it; rank 0's refusal (another writer, another spec) is every rank's. ``total``: the model's blocks."""
    from llmprune.resume import PartialOutput

    error = None
    if distributed.is_main():
        try:
            partial = PartialOutput(out, spec)
        except UsageError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)  # also: the others wait until rank 0 has made it
    if error is not None:
        raise UsageError(error)
    if not distributed.is_main():
        partial = PartialOutput(out, spec, readonly=True)
    partial.total = total
    _OPENED.append(partial)
    return partial


def releases_partials(fn):
    """The OUT.partial/ directories ``fn`` opens are unlocked when it returns or raises; one it leaves without
    a finished block (it failed, or was interrupted, before one) is removed: nothing written."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mark = len(_OPENED)
        failed = True
        try:
            result = fn(*args, **kwargs)
            failed = False
            return result
        finally:
            while len(_OPENED) > mark:
                _OPENED.pop().close(failed=failed)

    return wrapper


def _in_memory(model: nn.Module | None, mref: ModelRef | None, dtype: str, warn: bool, writes: bool):
    """(model, its loaded tokenizer or None, source, kind) of a run that holds the whole model: ``model`` as
    given when ``mref`` is None, else loaded whole (``warn``: say it is not streamed, and what that costs)."""
    if mref is None:
        return model, None, getattr(model, "name_or_path", "") or "in-memory", "memory"
    if warn:
        say_not_streamed(mref, dtype, writes)
    loaded, tokenizer = load_whole(mref, dtype, writes=writes)
    return loaded, tokenizer, mref.ref, mref.origin


@releases_partials
def compress_run(model: nn.Module | None, mref: ModelRef | None, out: Path | None, run: RunSpec, *, tokenizer,
                 lazy: bool, overwrite: bool, reuse: dict | None, progress: Progress, t0: float,
                 dist_read: str = "all", extra: dict | None = None) -> Report:
    """Compress a model (``model`` in memory, else the one ``mref`` names) as ``run`` says; with ``out``, write it.

    The source: a model already in memory is compressed in place; a local safetensors directory or streamable
    GGUF with an ``out`` is streamed block by block from disk (``lazy``); anything else is loaded whole. The
    sink: a streamed model's blocks go into OUT.partial/ as they finish (resumed if a run with this spec
    stopped), published as ``out`` when complete; a model in memory is written whole at the end, under the
    same one-writer lock. ``extra``: entries added to the report (a streamed shrink's, before ``--wbits``)."""
    streamed = mref is not None and lazy and out is not None and streams(mref)
    with contextlib.ExitStack() as held:
        windows = calib = sink = ident = None
        if streamed:
            model, loaded_tok, ident = open_lazy(mref, run.dtype, read_on_main=dist_read == "rank0",
                                                 writes=bf16_pays(run.device))
            source, kind = mref.ref, mref.origin
        else:
            held.enter_context(one_writer(out))
            model, loaded_tok, source, kind = _in_memory(model, mref, run.dtype, warn=lazy and out is not None,
                                                         writes=bf16_pays(run.device))
        dtype_notice(dtype_of(model), run.dtype, run.device, writes=mref is not None)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
        load_s = time.perf_counter() - t0 if mref is not None else 0.0
        if streamed:  # the journal's spec names the calibration windows, so they are cut before it opens
            windows, calib = calibration_set(tokenizer, model, run.calibration) if run.needs_data else (None, None)
            spec = {"recipe": run.recipe, "calibration": calib["sha256"] if calib else None, **ident,
                    "llmprune": __version__}
            sink = open_partial(out, spec, len(find_blocks(model)[1]))
            if sink.finished:
                log.info("resuming %s: %d blocks already done", sink.dir, len(sink.finished))
        grids: dict = {}
        report = compress_model(model, tokenizer, run, windows=windows, grids=grids, reuse_errors=reuse, sink=sink,
                                progress=progress, calibration=calib)
        report["timings"]["load_s"] = round(load_s, 3)
        dtype = describe(report, model, source, kind, **({"lazy": True} if streamed else {}))
        report.update(extra or {})
        if out is not None and distributed.is_main():  # torchrun: rank 0 writes
            if sink is not None:
                _publish_streamed(model, tokenizer, sink, out, run, report, dtype, overwrite, t0)
            else:  # every rank holds the model
                save_whole(out, model, tokenizer, report, grids, t0, run.output)
    if out is not None:
        report = distributed.broadcast_object(report)  # the others return rank 0's report, once out is complete
    else:
        report["checkpoint"] = None
        report["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    result = Report.from_dict(report)
    if not streamed:
        result.module, result.tokenizer = model, tokenizer
    return result


def _publish_streamed(model: nn.Module, tokenizer, partial, out: Path, run: RunSpec, report: dict,
                      dtype: torch.dtype, overwrite: bool, t0: float) -> None:
    """OUT.partial/'s finished blocks and the tensors outside them (as the input stores them) merged into
    ``out``, in compressed-tensors' layout when the run asks for it."""
    rest = model.block_source.rest_state()
    t_save = time.perf_counter()
    compressed = run.output.compressed_tensors
    writer = PackQuantizedWriter(run.output.activations)

    def convert(i: int, tensors: dict, grids: dict) -> dict:
        """Block ``i``'s quantized linears in compressed-tensors' pack-quantized layout."""
        keymap = model.block_source.keymap
        for name, params in grids.items():
            key = keymap.checkpoint_keys(f"{name}.weight")[0]  # as the input stores it (e.g. no base prefix)
            writer.pack(tensors, key.removesuffix(".weight"), name, params)
        return tensors

    def write_meta(directory: Path) -> None:
        save_metadata(model, tokenizer, directory)
        if compressed:
            if not writer.quantized:
                raise UsageError("no quantized layers to store as compressed-tensors: add --wbits")
            writer.write_config(model, directory, run.output.act_order)
            report["checkpoint"] = writer.info(weights_bytes(directory), str(dtype).removeprefix("torch."))
        else:
            report["checkpoint"] = dense_checkpoint_info(directory, dtype)
        report["timings"]["save_s"] = round(time.perf_counter() - t_save, 3)
        report["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
        write_report(directory, report)

    partial.publish(rest, write_meta, overwrite, convert if compressed else None)
    log.info("wrote %s", out)


def shrink_run(model: nn.Module | None, mref: ModelRef | None, out: Path | None, run: RunSpec,
               quantize: RunSpec | None, spec, *, tokenizer, lazy: bool, overwrite: bool, progress: Progress,
               t0: float) -> dict:
    """Shrink a model (``model`` in memory, else the one ``mref`` names) by ``spec``, then quantize it when
    ``quantize`` is given; with ``out``, write it. The same sources and sinks as ``compress_run``: a streamable
    directory is shrunk block by block into OUT.partial/ (``_shrink_streamed``), anything else in memory."""
    from llmprune.shrinking import shrink_model

    if lazy and out is not None and mref is not None and streams(mref):
        return _shrink_streamed(mref, out, run, quantize, spec, overwrite, t0, progress, tokenizer)
    with one_writer(out):
        m, loaded, source, kind = _in_memory(model, mref, run.dtype, warn=lazy and out is not None,
                                             writes=out is not None and bf16_pays(run.device))
        dtype_notice(dtype_of(m), run.dtype, run.device, writes=mref is not None and out is not None)
        tok = tokenizer if tokenizer is not None else loaded
        report = shrink_model(m, tok, run, spec, progress=progress)
        grids: dict = {}
        if quantize is not None:
            report = _quantize_shrunk(m, tok, quantize, report, grids, progress)
        describe(report, m, source, kind)
        if out is not None and distributed.is_main():  # torchrun: rank 0 writes; every rank holds the model
            save_whole(out, m, tok, report, grids, t0, run.output)
    if out is not None:
        report = distributed.broadcast_object(report)
    return report


@releases_partials
def _shrink_streamed(mref: ModelRef, out: Path, run: RunSpec, quantize: RunSpec | None, spec, overwrite: bool,
                 t0: float, progress: Progress, tokenizer) -> dict:
    """``shrink`` streamed from disk: one block in memory at a time, each shrunk block written to OUT.partial/
    as soon as it is done (with the journal compress keeps, so a re-run resumes), and the output assembled
    (blocks renumbered past the dropped ones) only once every block is in. With ``--wbits`` the shrunk model
    goes to a hidden directory beside ``out`` and is then quantized streamed from there (both stages resume).
    Rank 0 alone writes (torchrun)."""
    from llmprune.resume import spec_hash
    from llmprune.shrinking import shrink_model

    model, loaded_tok, ident = open_lazy(mref, run.dtype, writes=bf16_pays(run.device))
    dtype_notice(dtype_of(model), run.dtype, run.device, writes=True)
    tok = tokenizer if tokenizer is not None else loaded_tok
    src = model.block_source
    main = distributed.is_main()
    windows, calib = calibration_set(tok, model, run.calibration)
    key = {"shrink": dataclasses.asdict(spec), "recipe": run.recipe, "calibration": calib["sha256"],
           **ident,
           "llmprune": __version__}
    target = out if quantize is None else out.parent / f".{out.name}.shrunk"
    stamp = target / ".shrink-spec"  # --wbits: the shrunk stage finished for this very spec
    if quantize is not None and stamp.is_file() and stamp.read_text() == spec_hash(key):
        report = read_report(target)
        log.info("resuming: %s is already shrunk, quantizing it", target)
    else:
        partial = open_partial(target, key, len(find_blocks(model)[1]))
        done = {i: partial.layers(i)[0] for i in partial.finished}
        if done:
            log.info("resuming %s: %d blocks already done", partial.dir, len(done))
        for i in done:
            src.overrides[i] = partial.reader(i)

        def write_block(i: int, block: nn.Module, info: dict) -> None:
            partial.finish_block(i, {f"{src.path}.{i}.{k}": v for k, v in block.state_dict().items()}, [info], {})

        report = shrink_model(model, tok, run, spec, progress=progress, on_block_done=write_block, done=done,
                              calibration=(windows, calib))
        dtype = describe(report, model, mref.ref, mref.origin, lazy=True)
        if main:
            new_index = {i: j for j, i in enumerate(report["kept_blocks"])}

            def renumber(i: int, tensors: dict, grids: dict) -> dict:
                """Kept block i as block j, in the input's checkpoint layout (its keys, per-expert tensors)."""
                inside = f"{src.path}.{i}."
                return src.keymap.to_checkpoint({f"{src.path}.{new_index[i]}.{k.removeprefix(inside)}": v
                                                 for k, v in tensors.items()})

            def write_meta(directory: Path) -> None:
                save_metadata(model, tok, directory)
                report["checkpoint"] = dense_checkpoint_info(directory, dtype)
                report["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
                write_report(directory, report)
                if quantize is not None:
                    (directory / stamp.name).write_text(spec_hash(key))

            partial.publish(src.rest_state(), write_meta, overwrite or quantize is not None, renumber,
                            kept=report["kept_blocks"])
            log.info("wrote %s", target)
        report = distributed.broadcast_object(report)  # also: the others wait until the directory is complete
    if quantize is None:
        return report
    quantized = compress_run(None, resolve(str(target)), out, quantize, tokenizer=tokenizer or tok, lazy=True,
                             overwrite=overwrite, reuse=None, progress=progress, t0=t0,
                             extra={k: report[k] for k in (*SHRINK_KEYS, "model")}
                             | ({"shrink_reconstruction": report["reconstruction"]}
                                if report.get("reconstruction") is not None else {}))
    distributed.barrier()
    if main:  # kept until the quantized output is complete, so an interrupted run resumes from it
        shutil.rmtree(target, ignore_errors=True)
    return quantized.to_dict()


SHRINK_KEYS = ("shrink", "sizes", "dropped_experts", "dropped_blocks", "kept_blocks", "blocks", "params")


def _quantize_shrunk(model: nn.Module, tokenizer, quantize: RunSpec, shrunk: dict, grids: dict,
                     progress: Progress) -> dict:
    """``--wbits`` after shrinking: the smaller model's linears quantized (``quantize``: the run of
    ``_quantizing``) on the same calibration windows (a second streamed pass, as its inputs changed); the
    report is compress's, with the shrink's entries added."""
    report = compress_model(model, tokenizer, quantize, grids=grids, progress=progress)
    report["timings"] = {"shrink_s": shrunk["timings"]["shrink_s"], **report["timings"]}
    for key in SHRINK_KEYS:
        report[key] = shrunk[key]
    if shrunk.get("reconstruction") is not None:  # --reconstruct ran after each stage
        report["shrink_reconstruction"] = shrunk["reconstruction"]
    return report
