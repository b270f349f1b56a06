"""Keep ``torch.load(weights_only=True)`` and still resume LLaVA runs.

transformers 4.37 saves the RNG states of a checkpoint (``rng_state.pth``) with
numpy's generator state inside and loads them with a bare ``torch.load``. Since
torch 2.6 that defaults to ``weights_only=True``, which refuses numpy arrays: every
resume from ``checkpoint-N`` would die after the model has loaded. Allow-listing
the three numpy globals an array needs keeps the safe loader (no arbitrary code)
and makes resuming work.
"""
from __future__ import annotations


def numpy_array_globals() -> list:
    """What unpickling a numpy array needs: the array type, its dtype, and numpy's reconstructor."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]
    return [np.ndarray, np.dtype, _reconstruct, *dtypes]


def allow_checkpoint_rng_states() -> None:
    """Allow-list numpy arrays for ``weights_only`` loading (idempotent; no-op on old torch)."""
    import torch

    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(numpy_array_globals())
