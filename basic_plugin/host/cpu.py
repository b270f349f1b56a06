"""Workarounds that let LLaVA's unmodified ``train()`` run under DeepSpeed on a CPU-only box.

Both are no-ops wherever CUDA is available: on a GPU machine nothing is touched.
"""
from __future__ import annotations

import importlib

from typing import Callable, List, Optional

_undo_stack: Optional[List[Callable[[], None]]] = None


def _noop_synchronize(device=None) -> None:
    """Stand-in for ``torch.cuda.synchronize`` on CPU: there is no device queue to wait for."""


def _no_shm_op():
    """Stand-in for DeepSpeed's ``build_shm_op``: no shared-memory comm op, gloo is used."""
    return None


def apply_cpu_workarounds() -> Callable[[], None]:
    """Patch what LLaVA + DeepSpeed need on CPU; return a function that undoes it.

    Acts only when ``torch.cuda.is_available()`` is false, and only once (a second call
    changes nothing and returns the same undo).  It:

    * makes ``torch.cuda.synchronize`` a no-op: LLaVA's final save under DeepSpeed
      (``safe_save_model_for_hf_trainer``) calls it unconditionally, which raises without CUDA
      after the whole run has trained;
    * replaces ``deepspeed.comm.torch.build_shm_op`` by a function returning ``None``:
      otherwise DeepSpeed JIT-compiles its shared-memory CPU comm op (ninja + g++, 45-90 s,
      1.6 GB) when its first process group is made; gloo works without it.  Must run before
      DeepSpeed initialises its backend (before ``TrainingArguments`` are built).

    Nothing else is changed.
    """
    global _undo_stack
    if _undo_stack is not None:
        return remove_cpu_workarounds
    import torch

    if torch.cuda.is_available():
        return lambda: None
    undo: List[Callable[[], None]] = []

    original_sync = torch.cuda.synchronize
    torch.cuda.synchronize = _noop_synchronize
    undo.append(lambda: setattr(torch.cuda, "synchronize", original_sync))

    try:
        # Not ``import deepspeed.comm.torch as m``: ``deepspeed.comm`` re-exports the name
        # ``torch`` (the real torch) from ``from .comm import *``, so that form binds torch.
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # DeepSpeed not installed: nothing to patch
        ds_comm_torch = None
    if ds_comm_torch is not None and hasattr(ds_comm_torch, "build_shm_op"):
        original_build = ds_comm_torch.build_shm_op
        ds_comm_torch.build_shm_op = _no_shm_op
        undo.append(lambda: setattr(ds_comm_torch, "build_shm_op", original_build))

    _undo_stack = undo
    return remove_cpu_workarounds


def remove_cpu_workarounds() -> None:
    """Restore what :func:`apply_cpu_workarounds` patched (no-op if nothing is applied)."""
    global _undo_stack
    undo, _undo_stack = _undo_stack, None
    for fn in reversed(undo or []):
        fn()


def cpu_workarounds_active() -> bool:
    """Whether :func:`apply_cpu_workarounds` currently has patches in place."""
    return _undo_stack is not None


def finish_distributed() -> None:
    """Barrier, then destroy the default process group, if one exists.

    Call at the very end of a training entry point.  Without it, a rank that finishes first
    (every rank but 0, which is still saving) exits with gloo threads alive; about 1 run in
    12 of a 2-rank CPU run then aborted at interpreter exit with "terminate called without
    an active exception" (return code -6) after everything was saved.

    Destroying the group did not remove the abort entirely (a ZeRO-3 2-rank test still saw it
    once in three full suite runs), so a rank started by a launcher on the gloo backend then leaves
    without the interpreter's teardown, where the abort happens: streams flushed, logging shut
    down, ``os._exit(0)``. Only when this process was launched as a rank (``LOCAL_RANK`` set),
    so an in-process caller is never ended.
    """
    import logging
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.barrier()
        dist.destroy_process_group()
        if gloo and os.environ.get("LOCAL_RANK") is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(0)
