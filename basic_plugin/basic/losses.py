"""BASIC losses (pure torch): refined target, direction loss (DAS), distribution loss (SDS).

All row tensors are per image token: ``student`` is the projector output ``v_i`` (N, d),
``target`` the refined embedding ``vhat_i`` (N, d), ``weights`` the per-patch weights
``a_i`` (N,), ``vocab`` the vocabulary matrix ``E`` (V, d). The formulas are in INTEGRATION.md ("BASIC's flags").

Precision: math runs in fp32 for fp32/bf16/fp16 inputs (float64 stays float64, so
``torch.autograd.gradcheck`` is meaningful), with autocast disabled, because softmax/KL over
a 32K vocabulary in bf16 is too coarse. Losses are returned in that compute dtype.

Graph: the target and the weights are always detached (stop-gradient, as in the paper), and
the target distribution P is treated as a constant, also with respect to ``vocab`` (the
gradient into ``E`` flows only through Q, decision D2). With no image tokens (N == 0) every
loss is an exact zero that still depends on ``student`` (and ``vocab``), so each rank of a
distributed job builds the same graph and receives zero, not missing, gradients.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from basic_plugin.basic.target import target_weights

__all__ = ["refined_target", "direction_loss", "distribution_loss"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for low/single precision inputs, float64 if any input is float64."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _no_autocast(device: torch.device):
    """Disable autocast so that matmuls really run in the compute dtype."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()


def _check_floating(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_rows(student, target, weights) -> None:
    """Shared validation: student/target (N, d) with equal shapes, weights (N,)."""
    _check_floating("student", student)
    _check_floating("target", target)
    _check_floating("weights", weights)
    if student.dim() != 2:
        raise ValueError(f"student must be 2-D (N, d), got shape {tuple(student.shape)}")
    if target.shape != student.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal student shape {tuple(student.shape)}"
        )
    if weights.dim() != 1 or weights.shape[0] != student.shape[0]:
        raise ValueError(
            f"weights must have shape ({student.shape[0]},), got {tuple(weights.shape)}"
        )


# --------------------------------------------------------------------------------------
# Target
# --------------------------------------------------------------------------------------


def refined_target(layer_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Refined embedding ``vhat = sum_l w_l h_l`` with ``w_l = l^2 / sum_{j<=k} j^2``.

    ``layer_states`` is ``[h_1, ..., h_k]`` (hidden states after decoder layers 1..k at the
    image positions, same shape each). Deeper shallow layers refine more, hence the quadratic
    weights. Computed under ``no_grad`` (the paper's stop-gradient), accumulated in fp32 to
    avoid summing k bf16 tensors in bf16, and returned in the dtype of the inputs.
    """
    if isinstance(layer_states, torch.Tensor):
        raise ValueError("layer_states must be a sequence [h_1, ..., h_k] of tensors")
    states = list(layer_states)
    if not states:
        raise ValueError("layer_states must contain at least one tensor (k >= 1)")
    for l, h in enumerate(states, start=1):
        _check_floating(f"layer_states[{l - 1}]", h)
        if h.shape != states[0].shape:
            raise ValueError(
                f"all layer states must share one shape; layer {l} has {tuple(h.shape)}, "
                f"layer 1 has {tuple(states[0].shape)}"
            )
    weights = target_weights(len(states))
    out_dtype = states[0].dtype
    acc_dtype = _compute_dtype(*states)
    with torch.no_grad():
        acc = torch.zeros(states[0].shape, dtype=acc_dtype, device=states[0].device)
        for w, h in zip(weights, states):
            acc.add_(h.to(acc_dtype), alpha=w)
    return acc.to(out_dtype)


# --------------------------------------------------------------------------------------
# Direction loss (DAS)
# --------------------------------------------------------------------------------------


DIRECTION_CHUNK = 1024  # rows per chunk of the direction loss (chunk x d fp32 temporaries)


class _Direction(torch.autograd.Function):
    """``sum_i w_i ||u_i - v_i||^2`` with u = s/|s|, v = t/|t|, gradient computed in the forward.

    Autograd would keep several N x d fp32 intermediates (normalised rows, differences) per
    call; here each chunk of rows is processed once and only dL/ds (N x d, the gradient
    itself) is kept: dL/ds_i = 2 w_i ((u_i - v_i) - u_i (u_i . (u_i - v_i))) / |s_i| where
    |s_i| > eps, and 2 w_i (u_i - v_i) / eps where F.normalize's eps floor applies.
    """

    @staticmethod
    def forward(ctx, student, target, weights, eps, need_s):
        cdt = _compute_dtype(student, target)
        total = torch.zeros((), dtype=cdt, device=student.device)
        grad_s = torch.empty(student.shape, dtype=cdt, device=student.device) if need_s else None
        with _no_autocast(student.device):
            for start in range(0, student.shape[0], DIRECTION_CHUNK):
                stop = min(start + DIRECTION_CHUNK, student.shape[0])
                s_c = student[start:stop].to(cdt)
                norm = s_c.norm(dim=-1, keepdim=True).clamp_min_(eps)
                u = s_c / norm  # never in place: s_c may be a view of the caller's tensor
                v = F.normalize(target[start:stop].to(cdt), dim=-1, eps=eps)
                diff = u - v
                w_c = weights[start:stop].to(cdt)
                total.add_(torch.dot(w_c, diff.pow(2).sum(dim=-1)))
                if need_s:
                    floored = norm <= eps
                    radial = torch.where(floored, torch.zeros_like(norm), (u * diff).sum(-1, keepdim=True))
                    grad_s[start:stop] = diff.sub_(u.mul_(radial)).div_(norm).mul_((2 * w_c).unsqueeze(1))
        ctx.grad = grad_s  # handed on and dropped in backward (see _ChunkedKL)
        ctx.dtype = student.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.grad is None:
            raise RuntimeError("direction_loss supports one backward pass")
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_output.to(grad.dtype)).to(ctx.dtype), None, None, None, None


def direction_loss(
    student: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``sum_i w_i || s_i/|s_i| - t_i/|t_i| ||^2`` (= ``sum_i w_i (2 - 2 cos_i)``).

    Aligns only the direction of each projector output with its refined target, so the
    scale of the LLM's hidden states does not leak into the projector. ``eps`` bounds the
    norm from below (as ``F.normalize``) so zero rows give finite values and gradients.
    Gradient flows to ``student`` only; fp32 math, rows in chunks, no N x d intermediates
    kept for backward (which runs once).
    """
    _check_rows(student, target, weights)
    need_s = torch.is_grad_enabled() and student.requires_grad
    # For N == 0 the empty sum is a zero that is still a function of ``student``.
    return _Direction.apply(student, target.detach(), weights.detach(), float(eps), need_s)


# --------------------------------------------------------------------------------------
# Distribution loss (SDS)
# --------------------------------------------------------------------------------------


def _kl_rows_reference(zs: torch.Tensor, zt: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Per-row KL between softmax(zt) (P) and softmax(zs) (Q), (N, V) -> (N,)."""
    log_q = F.log_softmax(zs, dim=-1)
    log_p = F.log_softmax(zt, dim=-1)
    if reverse:
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class _ChunkedKL(torch.autograd.Function):
    """Weighted KL over the vocabulary, in row chunks, gradients computed in the forward.

    The per-chunk logits (chunk x V) are needed for both the loss and its gradient; keeping
    them for a later backward would hold N x V floats, recomputing them in the backward
    would cost 2 extra matmuls. Instead the forward does, per chunk, z_s = s E^T / T,
    z_t = t E^T / T, dL/ds = dz E, dL/dE += dz^T s (dz already holds w / T), i.e. the same
    4 matmuls as a naive forward + backward, and stores only dL/ds (N x d) and dL/dE (V x d).
    The backward multiplies them by grad_output. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, student, target, vocab, weights, temperature, reverse, chunk_size,
                need_s, need_v):
        cdt = _compute_dtype(student, target, vocab)
        n, d = student.shape
        inv_t = 1.0 / temperature
        with _no_autocast(student.device):
            # Upcast E once (a V x d copy only for low-precision vocab; no copy for fp32).
            e = vocab.to(cdt)
            total = torch.zeros((), dtype=cdt, device=student.device)
            grad_s = torch.zeros((n, d), dtype=cdt, device=student.device) if need_s else None
            grad_e = torch.zeros(e.shape, dtype=cdt, device=vocab.device) if need_v else None
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                s_c = student[start:stop].to(cdt)
                w_c = weights[start:stop].to(cdt)
                log_q = F.log_softmax(torch.mm(s_c, e.t()).mul_(inv_t), dim=-1)
                log_p = F.log_softmax(torch.mm(target[start:stop].to(cdt), e.t()).mul_(inv_t),
                                      dim=-1)
                q = log_q.exp()
                if reverse:
                    diff = log_q.sub_(log_p)  # log Q - log P (log_q is not needed after)
                    del log_p
                    kl = (q * diff).sum(dim=-1)
                    total.add_(torch.dot(w_c, kl))
                    if not (need_s or need_v):
                        continue
                    # dL/dz_s = w * Q * ((log Q - log P) - KL_i), folded with 1/T.
                    dz = diff.sub_(kl.unsqueeze(1)).mul_(q).mul_((w_c * inv_t).unsqueeze(1))
                else:
                    p = log_p.exp()
                    kl = (p * (log_p.sub_(log_q))).sum(dim=-1)
                    total.add_(torch.dot(w_c, kl))
                    if not (need_s or need_v):
                        continue
                    # dL/dz_s = w * (Q - P), folded with 1/T.
                    dz = q.sub_(p).mul_((w_c * inv_t).unsqueeze(1))
                if need_s:
                    grad_s[start:stop] = torch.mm(dz, e)
                if need_v:
                    grad_e.addmm_(dz.t(), s_c)
        # Plain attributes, not save_for_backward: backward hands these very tensors on and
        # drops them here, so the engine can take them over instead of copying V x d floats.
        ctx.grads = [grad_s, grad_e]
        ctx.dtypes = (student.dtype, vocab.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        # Scale the stored gradients in place: a scaled copy would hold the V x d vocabulary
        # gradient twice at the peak. So the stored values can be used once only.
        if ctx.grads is None:
            raise RuntimeError("distribution_loss(chunk_size=...) supports one backward pass; "
                               "use chunk_size=None to backward through it twice")
        (grad_s, grad_e), ctx.grads = ctx.grads, None
        s_dtype, v_dtype = ctx.dtypes
        gs = ge = None
        scale = grad_output.to(grad_s.dtype if grad_s is not None else grad_e.dtype)
        if ctx.needs_input_grad[0] and grad_s is not None:
            gs = grad_s.mul_(scale).to(s_dtype)
        if ctx.needs_input_grad[2] and grad_e is not None:
            ge = grad_e.mul_(scale).to(v_dtype)
        return gs, None, ge, None, None, None, None, None, None


def distribution_loss(
    student: torch.Tensor,
    target: torch.Tensor,
    vocab: torch.Tensor,
    weights: torch.Tensor,
    *,
    temperature: float = 1.0,
    reverse: bool = False,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """``sum_i w_i KL(P_i || Q_i)``, P = softmax(t E^T / T), Q = softmax(s E^T / T).

    Matches the vocabulary distribution of each projector output to that of its refined
    target (``reverse=True``: ``KL(Q_i || P_i)``). Gradient to ``student`` and, when
    ``vocab.requires_grad``, to ``vocab`` through Q only; never to target or weights.

    ``chunk_size=None`` is the plain autograd reference (holds N x V logits).
    ``chunk_size=c`` processes c rows at a time and never holds more than c x V logits,
    forward or backward; use it in training (576 x 32000 fp32 logits per image otherwise).
    """
    _check_rows(student, target, weights)
    _check_floating("vocab", vocab)
    if vocab.dim() != 2 or vocab.shape[1] != student.shape[1]:
        raise ValueError(
            f"vocab must have shape (V, {student.shape[1]}), got {tuple(vocab.shape)}"
        )
    if vocab.shape[0] == 0:
        raise ValueError("vocab must have at least one row")
    if isinstance(temperature, bool) or not float(temperature) > 0.0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    temperature = float(temperature)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    reverse = bool(reverse)

    target = target.detach()
    weights = weights.detach()

    if chunk_size is None:
        cdt = _compute_dtype(student, target, vocab)
        with _no_autocast(student.device):
            e = vocab.to(cdt)
            zs = torch.mm(student.to(cdt), e.t()) / temperature
            # P is a constant target: no gradient into E through it.
            zt = torch.mm(target.to(cdt), e.detach().t()) / temperature
            kl = _kl_rows_reference(zs, zt, reverse)
            return (weights.to(cdt) * kl).sum()

    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_v = grad_on and vocab.requires_grad
    return _ChunkedKL.apply(student, target, vocab, weights, temperature, reverse,
                            chunk_size, need_s, need_v)
