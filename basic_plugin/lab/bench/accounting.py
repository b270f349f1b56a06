"""Peak memory of a region, measured two independent ways, so that each checks the other.

* ``acct``: :class:`LiveTensorBytes`, a ``TorchDispatchMode`` that sees every aten op
  (forward, backward and optimizer alike) and keeps the bytes of every tensor storage
  created inside the region alive until the last tensor viewing it dies (a
  ``weakref.finalize`` per tensor; views and in-place results share their storage).
  Shape-driven, so it also runs on the ``meta`` device: exact for sizes that would not fit
  in RAM, in milliseconds.
* ``alloc``: :func:`allocator_peak`, the allocator itself. On CPU the ``torch.profiler``
  memory events (``profile_memory=True``: every allocation and free of the CPU allocator,
  in order) summed into a running total; on CUDA ``torch.cuda.max_memory_allocated``. This
  also sees the temporaries that live only inside one kernel (when they come from torch's
  allocator; the private packing buffers of BLAS libraries are seen by neither method).

:func:`storage_bytes` sizes what a run hands back (the gradients), so that the memory a loss
holds *beyond* the gradients it returns is ``peak - storage_bytes(grads)``, not ``peak -
whatever is alive at the end``: a buffer leaked past the run then counts as extra memory.
"""
from __future__ import annotations

import contextlib
import os
import sys
import weakref
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes", "allocator_peak", "storage_bytes"]


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):  # sparse, nested, ...
        return None


def storage_bytes(*tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (None entries skipped; meta tensors too)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = _storage_key(t)
        if key is None:
            total += t.numel() * t.element_size()
        elif key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class LiveTensorBytes(TorchDispatchMode):
    """Live bytes of the tensor storages created while the mode is active, and their peak.

    Every aten op passes through ``__torch_dispatch__``; each output whose storage is new
    (not one of the op's inputs' storages, i.e. neither a view nor an in-place result of a
    tensor that existed before) is counted with ``storage.nbytes()`` until every tensor that
    was returned on that storage has been freed. Autograd keeps the Python object of a saved
    tensor alive with the tensor, so saved activations stay counted until the graph frees
    them. Not counted: tensors that existed before the mode (the inputs) and kernel-internal
    scratch buffers never returned by an op (the allocator method sees those).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: Dict[int, list] = {}  # key -> [nbytes, tensors alive on it]

    def _release(self, key) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, t: torch.Tensor, input_keys) -> None:
        key = _storage_key(t)
        if key is None:
            return
        entry = self._storages.get(key)
        if entry is None:
            if key in input_keys:  # a view / in-place result of a tensor we did not see born
                return
            entry = self._storages[key] = [t.untyped_storage().nbytes(), 0]
            self.live += entry[0]
        else:
            nbytes = t.untyped_storage().nbytes()  # resized in place (out= ops)
            if nbytes != entry[0]:
                self.live += nbytes - entry[0]
                entry[0] = nbytes
        entry[1] += 1
        fin = weakref.finalize(t, self._release, key)
        fin.atexit = False
        if self.live > self.peak:
            self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outputs:
            input_keys = {_storage_key(t) for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor)}
            for t in outputs:
                self._track(t, input_keys)
        return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ writes too) for the duration of the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocator_peak(fn: Callable[[], object], device: torch.device):
    """(fn(), peak allocator bytes above the level at the start), from the allocator itself.

    CPU: ``torch.profiler`` with ``profile_memory=True`` records every CPU allocator
    allocation (+bytes) and free (-bytes) with a timestamp; the running sum's maximum is the
    peak. CUDA: ``torch.cuda.max_memory_allocated`` after a reset. Other devices: None.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return fn(), None
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the CPU profiler prints a line at start and at stop
        prof.start()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = []
    for ev in prof.profiler.kineto_results.events():
        if ev.name() == "[memory]" and ev.device_type() == torch.autograd.DeviceType.CPU:
            events.append((ev.start_ns(), ev.nbytes()))
    events.sort(key=lambda e: e[0])
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return result, peak
