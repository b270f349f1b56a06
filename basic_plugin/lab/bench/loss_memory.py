"""Naive vs chunked vs fused BASIC loss at LLaVA-1.5-7B shapes: peak extra memory and time per batch.

The loss is ``L_das + 0.01 * L_sds``, forward + backward, with the student (projector output)
and the vocabulary matrix both requiring grad, on three paths measured side by side:

* ``naive``: ``direction_loss + 0.01 * distribution_loss(chunk_size=None)`` (plain autograd
  KL, holds N x V logits);
* ``chunked``: the same two functions with ``chunk_size=c`` (each returns its own N x d
  student gradient, and autograd sums the two into a third);
* ``fused``: ``basic_terms_fused(..., chunk_size=c)``, the training path (one N x d student
  gradient buffer for both terms).

The CLI passes ``naive`` and ``chunked`` / ``chunked-<c>`` paths; each chunked path gets its
fused twin (``fused`` / ``fused-<c>``) here. Every batch size is accounted on the ``meta``
device (exact, milliseconds, any size); the ``time_batches`` also run for real (time +
allocator peak), when they fit in memory.

Memory, relative to the start of the run (the inputs, which exist before the loss in
training too, are excluded): "peak" includes the gradients the run returns; "grads" is the
size of those returned gradients (``student.grad`` and ``vocab.grad``, measured from the
tensors); "extra" = peak - grads is what the loss holds beyond them (the targets' measure);
"retained" is what is still alive at the end, which equals "grads" unless the loss leaks
(a leak is then part of "extra", never subtracted).
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from basic_plugin.lab.bench.accounting import LiveTensorBytes, allocator_peak, storage_bytes
from basic_plugin.lab.bench.machine import GB, available_bytes, sync

__all__ = ["LAMBDA_SDS", "LossInputs", "make_loss_inputs", "path_kind", "with_fused_paths", "loss_fwd_bwd",
           "account_loss", "loss_run", "measure_loss_cases"]

LAMBDA_SDS = 0.01  # BASIC's default weight of L_sds (L_das has weight 1)


@dataclass
class LossInputs:
    student: torch.Tensor  # (N, d), requires grad
    target: torch.Tensor  # (N, d)
    vocab: torch.Tensor  # (V, d), requires grad
    weights: torch.Tensor  # (N,)


def make_loss_inputs(batch: int, *, image_tokens: int = 576, hidden: int = 4096, vocab_size: int = 32000,
                     dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                     vocab: Optional[torch.Tensor] = None) -> LossInputs:
    """BASIC's loss inputs for ``batch`` images (N = batch * image_tokens rows).

    Scales like LLaVA's: projector output and refined target with unit-scale entries,
    an embedding matrix with std 0.02, raw patch weights summing to 1 per sample.
    ``device="meta"`` gives shapes only (for the accounting method).
    """
    device = torch.device(device)
    n = batch * image_tokens
    if device.type == "meta":
        s = torch.empty(n, hidden, dtype=dtype, device=device)
        t = torch.empty(n, hidden, dtype=dtype, device=device)
        w = torch.empty(n, dtype=torch.float32, device=device)
        if vocab is None:
            vocab = torch.empty(vocab_size, hidden, dtype=dtype, device=device).requires_grad_()
        return LossInputs(s.requires_grad_(), t, vocab, w)
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
    t = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
    w = (torch.rand(n, generator=g) * (2.0 / image_tokens) / max(batch, 1)).to(device)
    if vocab is None:
        vocab = (torch.randn(vocab_size, hidden, generator=g) * 0.02).to(device=device, dtype=dtype)
        vocab.requires_grad_()
    return LossInputs(s.requires_grad_(), t, vocab, w)


def _clear_grads(inp: LossInputs) -> None:
    inp.student.grad = None
    inp.vocab.grad = None


def path_kind(name: str) -> str:
    """``naive``, ``chunked`` or ``fused`` for a path name (``chunked-64`` -> ``chunked``)."""
    kind = name.split("-", 1)[0]
    if kind not in ("naive", "chunked", "fused"):
        raise ValueError(f"unknown loss path {name!r}")
    return kind


def with_fused_paths(paths: Sequence[Tuple[str, Optional[int]]]) -> List[Tuple[str, Optional[int]]]:
    """The CLI's paths, each chunked one followed by its fused twin (same chunk size), once."""
    out: List[Tuple[str, Optional[int]]] = []
    names = {name for name, _ in paths}
    for name, cs in paths:
        out.append((name, cs))
        if path_kind(name) == "chunked":
            twin = "fused" + name[len("chunked"):]
            if twin not in names:
                out.append((twin, cs))
                names.add(twin)
    return out


def loss_fwd_bwd(inp: LossInputs, chunk_size: Optional[int], fused: bool = False) -> torch.Tensor:
    """``L_das + 0.01 * L_sds``, forward and backward (grads land in student/vocab .grad).

    ``fused``: both terms from ``basic_terms_fused`` (one student-gradient buffer), summed as
    the trainer sums them; otherwise the two separate functions.
    """
    from basic_plugin.basic.losses import basic_terms_fused, direction_loss, distribution_loss

    _clear_grads(inp)
    if fused:
        das, sds = basic_terms_fused(inp.student, inp.target, inp.vocab, inp.weights, 1.0, LAMBDA_SDS,
                                     chunk_size=chunk_size)
        loss = das + sds
        del das, sds
    else:
        loss = direction_loss(inp.student, inp.target, inp.weights) + LAMBDA_SDS * distribution_loss(
            inp.student, inp.target, inp.vocab, inp.weights, chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


def _returned_grad_bytes(inp: LossInputs) -> int:
    return storage_bytes(inp.student.grad, inp.vocab.grad)


def account_loss(inp: LossInputs, chunk_size: Optional[int], fused: bool = False) -> Dict[str, int]:
    """acct peak / retained bytes and the returned gradients' bytes of one forward+backward
    (any device, meta included)."""
    _clear_grads(inp)
    gc.collect()
    with LiveTensorBytes() as acct:
        loss = loss_fwd_bwd(inp, chunk_size, fused)
        del loss
        retained = acct.live
        grads = _returned_grad_bytes(inp)
    peak = acct.peak
    _clear_grads(inp)
    return {"acct_peak": peak, "acct_retained": retained, "grad_bytes": grads}


def loss_run(inp: LossInputs, chunk_size: Optional[int], *, fused: bool = False, instrument: bool = True,
             allocator: bool = True) -> Dict[str, object]:
    """One forward+backward: wall time, and (``instrument``) acct and allocator peaks.

    The accounting mode and the profiler add a few microseconds per aten op (tens of ms
    for the chunked path's thousands of ops at 7B shapes, against seconds of matmuls).
    """
    device = inp.student.device
    _clear_grads(inp)
    gc.collect()
    sync(device)
    out: Dict[str, object] = {"acct_peak": None, "acct_retained": None, "grad_bytes": None, "alloc_peak": None}
    cpu0 = time.process_time()
    if instrument:
        def run():
            with LiveTensorBytes() as acct:
                t0 = time.perf_counter()
                loss_fwd_bwd(inp, chunk_size, fused)  # the returned scalar dies here, before `live` is read
                sync(device)
                elapsed = time.perf_counter() - t0
                return acct.peak, acct.live, elapsed

        if allocator:
            (peak, retained, elapsed), alloc = allocator_peak(run, device)
        else:
            (peak, retained, elapsed), alloc = run(), None
        out.update(acct_peak=peak, acct_retained=retained, alloc_peak=alloc, grad_bytes=_returned_grad_bytes(inp))
    elif device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss_fwd_bwd(inp, chunk_size, fused)
        stop.record()
        torch.cuda.synchronize(device)
        elapsed = start.elapsed_time(stop) / 1000.0
    else:
        t0 = time.perf_counter()
        loss_fwd_bwd(inp, chunk_size, fused)
        elapsed = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - cpu0
    _clear_grads(inp)
    out["time_s"] = elapsed
    return out


def measure_loss_cases(*, batches: Sequence[int], time_batches: Sequence[int],
                       paths: Sequence[Tuple[str, Optional[int]]], repeats: int, image_tokens: int, hidden: int,
                       vocab_size: int, dtype: torch.dtype, device: torch.device, allocator: bool,
                       progress) -> List[Dict[str, object]]:
    """One row per (batch, path): meta accounting for every batch, real runs for ``time_batches``.

    ``paths``: ``(name, chunk_size)`` pairs, ``("naive", None)`` first; each ``chunked`` path
    gets its ``fused`` twin (:func:`with_fused_paths`). A real run that
    would need more than 90% of the available memory (meta peak + 15%, inputs, 256 MiB) is
    skipped with a note. The real runs of one batch share one set of inputs, and their
    repeats are interleaved across paths so that all paths share the machine's ups and
    downs; the first repeat of each path is the instrumented one. ``progress``: an object
    with ``set(text)``, ``tick(n=1)`` and ``note(text)``.
    """
    given = list(paths)
    paths = with_fused_paths(given)
    added = len(paths) - len(given)
    bar = getattr(progress, "bar", None)  # the CLI sized its bar for the paths it passed
    if added and bar is not None and getattr(bar, "total", None) is not None:
        bar.total += added * (len(batches) + len(time_batches) * repeats)
        bar.refresh()
    rows: Dict[tuple, Dict[str, object]] = {}
    meta_vocab = None
    for b in batches:
        for path, cs in paths:
            progress.set(f"acct meta b{b} {path}")
            inp = make_loss_inputs(b, image_tokens=image_tokens, hidden=hidden, vocab_size=vocab_size,
                                   dtype=dtype, device="meta", vocab=meta_vocab)
            meta_vocab = inp.vocab
            acct = account_loss(inp, cs, path_kind(path) == "fused")
            rows[(b, path)] = {"batch": b, "path": path, "kind": path_kind(path), "chunk_size": cs,
                               "rows": b * image_tokens,
                               "meta_acct_peak": acct["acct_peak"], "meta_acct_retained": acct["acct_retained"],
                               "acct_peak": acct["acct_peak"], "acct_retained": acct["acct_retained"],
                               "grad_bytes": acct["grad_bytes"], "extra": acct["acct_peak"] - acct["grad_bytes"],
                               "alloc_peak": None, "time_s": None, "time_min_s": None, "times": [],
                               "cpu_s": None, "cpus": [], "ran": False, "note": ""}
            progress.tick()
    vocab = None
    for b in time_batches:
        n = b * image_tokens
        elem = torch.tensor([], dtype=dtype).element_size()
        inputs_bytes = 2 * n * hidden * elem + (0 if vocab is not None else vocab_size * hidden * elem)
        runnable = []
        for path, cs in paths:
            row = rows[(b, path)]
            avail = available_bytes(device)
            need = int(row["meta_acct_peak"] * 1.15) + inputs_bytes + 256 * 1024 ** 2
            if avail is not None and need > 0.9 * avail:
                row["note"] = f"not run: needs ~{need / GB:.1f} GB, {avail / GB:.1f} GB available"
                progress.note(f"[bench] batch {b} {path}: {row['note']}")
                progress.tick(repeats)
            else:
                runnable.append((path, cs))
        if not runnable:
            continue
        inp = make_loss_inputs(b, image_tokens=image_tokens, hidden=hidden, vocab_size=vocab_size,
                               dtype=dtype, device=device, vocab=vocab)
        vocab = inp.vocab
        for r in range(repeats):
            for path, cs in runnable:
                row = rows[(b, path)]
                progress.set(f"run b{b} {path} {r + 1}/{repeats}")
                res = loss_run(inp, cs, fused=path_kind(path) == "fused", instrument=r == 0, allocator=allocator)
                row["times"].append(res["time_s"])
                row["cpus"].append(res["cpu_s"])
                row["ran"] = True
                if r == 0:
                    row.update(acct_peak=res["acct_peak"], acct_retained=res["acct_retained"],
                               grad_bytes=res["grad_bytes"], extra=res["acct_peak"] - res["grad_bytes"],
                               alloc_peak=res["alloc_peak"])
                    if res["acct_peak"] != row["meta_acct_peak"]:
                        row["note"] = (f"acct on {device.type} {res['acct_peak']} B differs from meta "
                                       f"{row['meta_acct_peak']} B")
                row["time_s"] = statistics.median(row["times"])
                row["time_min_s"] = min(row["times"])
                row["cpu_s"] = statistics.median(row["cpus"])
                progress.tick()
        del inp
        gc.collect()
    del vocab, meta_vocab
    gc.collect()
    return [rows[k] for k in sorted(rows)]
