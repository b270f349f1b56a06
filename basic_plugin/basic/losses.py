"""BASIC losses (pure torch): refined target, direction loss (DAS), distribution loss (SDS).

All row tensors are per image token: ``student`` is the projector output ``v_i`` (N, d),
``target`` the refined embedding ``vhat_i`` (N, d), ``weights`` the per-patch weights
``a_i`` (N,), ``vocab`` the vocabulary matrix ``E`` (V, d). The formulas: docs/DECISIONS.md.

Precision: math runs in fp32 for fp32/bf16/fp16 inputs (float64 stays float64, so
``torch.autograd.gradcheck`` is meaningful), with autocast disabled, because softmax/KL over
a 32K vocabulary in bf16 is too coarse. Losses are returned in that compute dtype.

Graph: the target and the weights are always detached (stop-gradient, as in the paper), and
the target distribution P is treated as a constant, also with respect to ``vocab`` (the
gradient into ``E`` flows only through Q, decision D2). With no image tokens (N == 0) every
loss is an exact zero that still depends on ``student`` (and ``vocab``), so each rank of a
distributed job builds the same graph and receives zero, not missing, gradients.

Training uses :func:`basic_terms_fused`: both terms from one autograd Function that writes the
lambda-weighted student gradients of both into ONE preallocated buffer (the gradient it then
returns), chunk by chunk, so the loss holds no batch-sized memory beyond the gradients it
returns. ``direction_loss`` and ``distribution_loss`` are the same math one term at a time.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from basic_plugin.basic.arguments import flag_default
from basic_plugin.basic.target import target_weights

__all__ = ["refined_target", "direction_loss", "distribution_loss", "basic_terms_fused"]


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


def _direction_rows(s_c: torch.Tensor, t_c: torch.Tensor, eps: float):
    """(|s| floored at eps, u = s/|s|, u - t/|t|, ||u - t/|t|||^2 per row) for one chunk of rows."""
    norm = s_c.norm(dim=-1, keepdim=True).clamp_min_(eps)
    u = s_c / norm  # never in place: s_c may be a view of the caller's tensor
    diff = u - F.normalize(t_c, dim=-1, eps=eps)
    return norm, u, diff, diff.pow(2).sum(dim=-1)


def _direction_grad_(norm, u, diff, coef, eps):
    """d/ds of ``sum_i coef_i / 2 * ||u_i - v_i||^2`` for one chunk, in place in ``diff`` (and ``u``).

    ``coef`` is ``2 w`` (times lambda in the fused path): ``coef_i ((u_i - v_i) - u_i (u_i . (u_i - v_i))) / |s_i|``
    where |s_i| > eps, ``coef_i (u_i - v_i) / eps`` where F.normalize's eps floor applies.
    """
    floored = norm <= eps
    radial = torch.where(floored, torch.zeros_like(norm), (u * diff).sum(-1, keepdim=True))
    return diff.sub_(u.mul_(radial)).div_(norm).mul_(coef.unsqueeze(1))


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
                norm, u, diff, sq = _direction_rows(student[start:stop].to(cdt), target[start:stop].to(cdt), eps)
                w_c = weights[start:stop].to(cdt)
                total.add_(torch.dot(w_c, sq))
                if need_s:
                    grad_s[start:stop] = _direction_grad_(norm, u, diff, 2 * w_c, eps)
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


def _kl_rows_chunk(s_c, t_c, e, inv_t: float, reverse: bool, dz_scale):
    """(KL_i per row, dz) for one chunk of c rows: z_s = s E^T / T, z_t = t E^T / T.

    ``dz`` is dKL_i/dz_s scaled per row by ``dz_scale`` (which folds the weight and 1/T, and
    lambda in the fused path); None when ``dz_scale`` is None (no gradient wanted). Both
    logits come from one GEMM on ``[s; t]`` (one pass over E instead of two), and the chunk
    x V temporaries are reused in place: at most 4 c x V floats are alive (during the
    log-softmax), 3 when the function returns (``dz`` views the 2c x V log-softmax buffer).
    The caller drops ``dz`` before the next chunk.
    """
    c = s_c.shape[0]
    log_qp = F.log_softmax(torch.mm(torch.cat((s_c, t_c)), e.t()).mul_(inv_t), dim=-1)
    log_q, log_p = log_qp[:c], log_qp[c:]
    if reverse:
        q = log_q.exp()
        diff = log_q.sub_(log_p)  # log Q - log P (log_q is not needed after)
        kl = (q * diff).sum(dim=-1)
        if dz_scale is None:
            return kl, None
        # dKL/dz_s = Q * ((log Q - log P) - KL_i)
        return kl, diff.sub_(kl.unsqueeze(1)).mul_(q).mul_(dz_scale.unsqueeze(1))
    p = log_p.exp()
    diff = log_p.sub_(log_q)  # log P - log Q
    kl = (p * diff).sum(dim=-1)
    if dz_scale is None:
        return kl, None
    # dKL/dz_s = Q - P (Q computed in place of log Q, which is not needed after)
    return kl, log_q.exp_().sub_(p).mul_(dz_scale.unsqueeze(1))


class _ChunkedKL(torch.autograd.Function):
    """Weighted KL over the vocabulary, in row chunks, gradients computed in the forward.

    The per-chunk logits (chunk x V) are needed for both the loss and its gradient; keeping
    them for a later backward would hold N x V floats, recomputing them in the backward
    would cost 2 extra matmuls. Instead the forward does, per chunk, [z_s; z_t] = [s; t] E^T / T
    (one GEMM), dL/ds = dz E, dL/dE += dz^T s (dz already holds w / T), i.e. the FLOPs of the
    4 matmuls of a naive forward + backward, and stores only dL/ds (N x d) and dL/dE (V x d).
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
                kl, dz = _kl_rows_chunk(s_c, target[start:stop].to(cdt), e, inv_t, reverse,
                                        w_c * inv_t if (need_s or need_v) else None)
                total.add_(torch.dot(w_c, kl))
                if dz is not None:
                    if need_s:
                        grad_s[start:stop] = torch.mm(dz, e)
                    if need_v:
                        grad_e.addmm_(dz.t(), s_c)
                del kl, dz  # before the next chunk's logits: never two chunks' buffers at once
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


def _check_sds_args(student, vocab, temperature, chunk_size, reverse):
    """Validation of the distribution loss's own arguments; (temperature, reverse) normalised."""
    _check_floating("vocab", vocab)
    if vocab.dim() != 2 or vocab.shape[1] != student.shape[1]:
        raise ValueError(
            f"vocab must have shape (V, {student.shape[1]}), got {tuple(vocab.shape)}"
        )
    if vocab.shape[0] == 0:
        raise ValueError("vocab must have at least one row")
    if isinstance(temperature, bool) or not float(temperature) > 0.0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return float(temperature), bool(reverse)


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
    temperature, reverse = _check_sds_args(student, vocab, temperature, chunk_size, reverse)

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


# --------------------------------------------------------------------------------------
# Both terms, one student gradient buffer (the training path)
# --------------------------------------------------------------------------------------


def _student_scale(g_das: torch.Tensor, g_sds: torch.Tensor, lambda_das: float, lambda_sds: float):
    """The one factor by which the stored ``lambda_das dL_das/ds + lambda_sds dL_sds/ds`` is scaled.

    The buffer holds the sum, so it can only be scaled as a whole: both terms must reach the
    loss with the same weight (as in ``loss = lm + das + sds``, also under loss scaling or
    gradient accumulation), unless one lambda is zero and the buffer holds one term only.
    """
    if lambda_das == 0.0:
        return g_sds
    if lambda_sds == 0.0:
        return g_das
    if g_das.device.type != "meta" and not torch.equal(g_das, g_sds):
        raise RuntimeError(
            "basic_terms_fused: the two terms reached the loss with different weights "
            f"({float(g_das):g} and {float(g_sds):g}); they share one student gradient buffer, so "
            "they must enter the loss as a plain sum (put weights into lambda_das/lambda_sds), "
            "or use direction_loss and distribution_loss separately")
    return g_das


class _FusedTerms(torch.autograd.Function):
    """``(lambda_das L_das, lambda_sds L_sds)``, both gradients computed in the forward into one buffer.

    Per chunk of rows: the direction term's gradient is computed in place in its chunk
    temporaries, the KL's ``dz E`` is added to it (``addmm_``, both already lambda-weighted),
    and the sum is written once into the student-gradient buffer (N x d, allocated in the
    student's dtype: a bf16 student gets a bf16 buffer, the chunk sums are fp32). E's gradient
    (``lambda_sds dz^T s``) accumulates in fp32 as in ``_ChunkedKL``. The backward scales the
    buffers in place by the incoming gradient and hands them on (the engine takes them over as
    ``.grad``), so nothing beyond the returned gradients and a few chunk temporaries is held.
    No input is saved for the backward. Backward once; not twice differentiable.

    The L_das value is summed over the rows in ``DIRECTION_CHUNK`` groups and the L_sds value
    in ``chunk_size`` groups, exactly as ``direction_loss`` and ``distribution_loss`` do. At
    ``lambda_sds == 0`` the distribution term is not computed (no logits): its value is 0 and
    so is its gradient, as they would be from the full computation times 0.
    """

    @staticmethod
    def forward(ctx, student, target, vocab, weights, lambda_das, lambda_sds, temperature, reverse,
                chunk_size, eps, need_s, need_v):
        cdt = _compute_dtype(student, target, vocab)
        n, d = student.shape
        dev = student.device
        inv_t = 1.0 / temperature
        kl_on = lambda_sds != 0.0  # at lambda_sds 0 the term is 0: no logits (a third of a CPU step)
        kl_grad = (need_s or need_v) and kl_on
        das_grad = need_s and lambda_das != 0.0
        with _no_autocast(dev):
            e = vocab.to(cdt)  # one V x d copy only for a low-precision vocabulary
            das_rows = torch.empty(n, dtype=cdt, device=dev)  # ||u_i - v_i||^2, N floats
            total_sds = torch.zeros((), dtype=cdt, device=dev)
            grad_s = torch.empty((n, d), dtype=student.dtype, device=dev) if need_s else None
            grad_e = torch.zeros(e.shape, dtype=cdt, device=vocab.device) if need_v else None
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                s_c = student[start:stop].to(cdt)
                t_c = target[start:stop].to(cdt)
                w_c = weights[start:stop].to(cdt)
                norm, u, diff, sq = _direction_rows(s_c, t_c, eps)
                das_rows[start:stop] = sq
                kl = dz = None
                if kl_on:
                    kl, dz = _kl_rows_chunk(s_c, t_c, e, inv_t, reverse,
                                            w_c * (inv_t * lambda_sds) if kl_grad else None)
                    total_sds.add_(torch.dot(w_c, kl))
                if need_s:
                    if das_grad:
                        g = _direction_grad_(norm, u, diff, w_c * (2.0 * lambda_das), eps)
                        if dz is not None:
                            g.addmm_(dz, e)
                    elif dz is not None:
                        g = torch.mm(dz, e)
                    else:
                        g = diff.zero_()
                    grad_s[start:stop] = g
                del norm, u, diff, sq
                if need_v and dz is not None:
                    grad_e.addmm_(dz.t(), s_c)
                del kl, dz  # before the next chunk's logits: never two chunks' buffers at once
            total_das = torch.zeros((), dtype=cdt, device=dev)
            for start in range(0, n, DIRECTION_CHUNK):
                stop = min(start + DIRECTION_CHUNK, n)
                total_das.add_(torch.dot(weights[start:stop].to(cdt), das_rows[start:stop]))
        ctx.grads = [grad_s, grad_e]
        ctx.lambdas = (lambda_das, lambda_sds)
        ctx.v_dtype = vocab.dtype
        return total_das * lambda_das, total_sds * lambda_sds

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_das, g_sds):
        if ctx.grads is None:
            raise RuntimeError("basic_terms_fused supports one backward pass")
        (grad_s, grad_e), ctx.grads = ctx.grads, None
        gs = ge = None
        if ctx.needs_input_grad[0] and grad_s is not None:
            scale = _student_scale(g_das, g_sds, *ctx.lambdas) if grad_s.numel() else g_das
            gs = grad_s.mul_(scale.to(grad_s.dtype))  # exact for the usual scale 1
        if ctx.needs_input_grad[2] and grad_e is not None:
            ge = grad_e.mul_(g_sds.to(grad_e.dtype)).to(ctx.v_dtype)
        return gs, None, ge, None, None, None, None, None, None, None, None, None


def basic_terms_fused(
    student: torch.Tensor,
    target: torch.Tensor,
    vocab: torch.Tensor,
    weights: torch.Tensor,
    lambda_das: float = flag_default("basic_lambda_das"),
    lambda_sds: float = flag_default("basic_lambda_sds"),
    temperature: float = flag_default("basic_temperature"),
    reverse: bool = flag_default("basic_kl") == "reverse",
    chunk_size: Optional[int] = flag_default("basic_sds_chunk_size"),
    *,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lambda_das * direction_loss(...), lambda_sds * distribution_loss(...))`` in one pass.

    The values equal those of the two functions (the same chunk math and the same summation
    order; the direction term's chunk temporaries are ``chunk_size`` rows here). The two
    terms share one student-gradient buffer, written chunk by chunk with the lambda-weighted
    gradients of both, and E's gradient (when ``vocab`` requires grad) is accumulated in the
    same pass, so the memory beyond the returned gradients does not grow with N.

    The two outputs must enter the loss as a plain sum (each with the same incoming gradient,
    which loss scaling and gradient accumulation preserve); a backward with different incoming
    gradients raises, unless one lambda is zero. Backward once. ``chunk_size=None`` is the
    plain autograd reference for both terms (``distribution_loss(chunk_size=None)``).
    """
    _check_rows(student, target, weights)
    for name, lam in (("lambda_das", lambda_das), ("lambda_sds", lambda_sds)):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ValueError(f"{name} must be a finite number, got {lam!r}")
    lambda_das, lambda_sds = float(lambda_das), float(lambda_sds)
    if chunk_size is None:
        das = direction_loss(student, target, weights, eps=eps)
        sds = distribution_loss(student, target, vocab, weights, temperature=temperature,
                                reverse=reverse, chunk_size=None)
        return das * lambda_das, sds * lambda_sds
    # the same validation as distribution_loss (vocab shape, temperature, chunk size)
    temperature, reverse = _check_sds_args(student, vocab, temperature, chunk_size, reverse)
    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_v = grad_on and vocab.requires_grad
    return _FusedTerms.apply(student, target.detach(), vocab, weights.detach(), lambda_das, lambda_sds,
                             temperature, reverse, chunk_size, float(eps), need_s, need_v)
