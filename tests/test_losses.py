"""Tests for basic_plugin/basic/losses.py against independent float64 references.

The references below are written from the formulas in BASIC.md (plain loops / einsum in
float64) and never call the functions under test.
"""

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from basic_plugin.basic.losses import basic_terms_fused, direction_loss, distribution_loss, refined_target



@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost (large on a busy box)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


NS = [0, 1, 7, 13]
DS = [5, 16]
VS = [11, 37, 101]
CHUNKS = [1, 3, 5, None]


# --------------------------------------------------------------------------------------
# Independent float64 references
# --------------------------------------------------------------------------------------


def ref_refined(states):
    k = len(states)
    denom = sum(j * j for j in range(1, k + 1))
    out = torch.zeros(states[0].shape, dtype=torch.float64)
    for l in range(1, k + 1):
        out = out + (l * l / denom) * states[l - 1].double()
    return out


def ref_direction(s, t, w, eps=None):
    """Row by row; ``eps`` floors the norms as ``F.normalize`` does (None: plain division)."""
    s, t, w = s.double(), t.double(), w.double()
    total = 0.0 * s.sum()  # an empty sum that stays differentiable (for N == 0)

    def norm(x):  # max(|x|, eps) = sqrt(max(|x|^2, eps^2)): finite derivative at x = 0
        sq = (x * x).sum()
        return torch.sqrt(sq if eps is None else torch.clamp(sq, min=eps * eps))

    for i in range(s.shape[0]):
        a = s[i] / norm(s[i])
        b = t[i] / norm(t[i])
        total = total + w[i] * ((a - b) ** 2).sum()
    return total


def _softmax64(z):
    m = z.max()
    e = torch.exp(z - m)
    return e / e.sum()


def ref_distribution(s, t, E, w, T, reverse):
    """sum_i w_i KL(P_i||Q_i) (or KL(Q_i||P_i)), row by row, float64.

    Differentiable wrt s and E (P uses a detached E, as the spec's gradients say)."""
    s, E, w = s.double(), E.double(), w.detach().double()
    t = t.detach().double()
    total = 0.0 * (s.sum() + E.sum())  # an empty sum that stays differentiable (for N == 0)
    for i in range(s.shape[0]):
        zq = torch.einsum("d,vd->v", s[i], E) / T
        zp = torch.einsum("d,vd->v", t[i], E.detach()) / T
        q, p = _softmax64(zq), _softmax64(zp)
        if reverse:
            kl = (q * (torch.log(q) - torch.log(p))).sum()
        else:
            kl = (p * (torch.log(p) - torch.log(q))).sum()
        total = total + w[i] * kl
    return total


def make_inputs(n, d, v, dtype=torch.float32, seed=0, weights="random"):
    g = torch.Generator().manual_seed(seed * 1000 + n * 100 + d * 10 + v)
    s = torch.randn(n, d, generator=g)
    t = torch.randn(n, d, generator=g) * 3.0  # different scale: direction must ignore it
    E = torch.randn(v, d, generator=g)
    if weights == "uniform":
        w = torch.full((n,), 1.0 / max(n, 1))
    else:
        w = torch.rand(n, generator=g)
        if n > 2:
            w[1] = 0.0  # a zero weight in the mix
    return s.to(dtype), t.to(dtype), E.to(dtype), w.to(dtype)


def tols(dtype):
    # bf16 inputs are exact in fp32/64, so the loss only sees fp32 math error; gradients are
    # returned in bf16 and get loose tolerances.
    if dtype == torch.bfloat16:
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# refined_target
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,expected",
    [
        (1, [1.0]),
        (2, [1 / 5, 4 / 5]),
        (3, [1 / 14, 4 / 14, 9 / 14]),
        (4, [1 / 30, 4 / 30, 9 / 30, 16 / 30]),
    ],
)
def test_refined_target_layer_weights_by_hand(k, expected):
    # h_l = one-hot e_l: the output row is exactly the weight vector.
    states = [torch.eye(k)[l].unsqueeze(0) for l in range(k)]
    out = refined_target(states)
    torch.testing.assert_close(out[0].double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,k", [(0, 5, 3), (7, 5, 1), (13, 16, 4), (3, 16, 16)])
def test_refined_target_matches_reference(dtype, n, d, k):
    g = torch.Generator().manual_seed(n + d + k)
    states = [torch.randn(n, d, generator=g).to(dtype).requires_grad_() for _ in range(k)]
    out = refined_target(states)
    assert out.dtype == dtype and out.shape == (n, d)
    assert not out.requires_grad and out.grad_fn is None
    # fp32 accumulation: the result is the fp32/64 sum rounded once to the output dtype.
    expected = ref_refined([h.detach() for h in states]).to(dtype)
    torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_refined_target_validation():
    with pytest.raises(ValueError):
        refined_target([])
    with pytest.raises(ValueError):
        refined_target([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError):
        refined_target(torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------------------
# direction_loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wkind", ["uniform", "random"])
@pytest.mark.parametrize("n,d", list(itertools.product(NS, DS)))
def test_direction_loss_matches_reference(n, d, wkind, dtype):
    s, t, _, w = make_inputs(n, d, 3, dtype, weights=wkind)
    s.requires_grad_()
    t.requires_grad_()
    w.requires_grad_()
    out = direction_loss(s, t, w)
    assert out.dim() == 0 and out.dtype == torch.float32
    s64 = s.detach().double().requires_grad_()
    ref = ref_direction(s64, t.detach(), w.detach())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    out.backward()
    ref.backward()
    assert t.grad is None and w.grad is None
    assert s.grad is not None and s.grad.dtype == dtype and s.grad.shape == (n, d)
    torch.testing.assert_close(s.grad.double(), s64.grad, **tols(dtype))


def test_direction_loss_is_two_minus_two_cos():
    s, t, _, w = make_inputs(9, 16, 3, torch.float64)
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    expected = (w * (2 - 2 * cos)).sum()
    torch.testing.assert_close(direction_loss(s, t, w), expected, rtol=1e-10, atol=1e-10)
    # scale invariance in both arguments
    torch.testing.assert_close(direction_loss(5 * s, 0.1 * t, w), expected, rtol=1e-10,
                               atol=1e-10)


def test_direction_loss_zero_rows_are_finite():
    s = torch.zeros(2, 4, requires_grad=True)
    t = torch.randn(2, 4)
    out = direction_loss(s, t, torch.ones(2))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_direction_loss_empty_is_connected_zero():
    s = torch.randn(0, 8, requires_grad=True)
    out = direction_loss(s, torch.randn(0, 8), torch.ones(0))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert s.grad is not None and s.grad.shape == (0, 8)


def test_direction_loss_validation():
    with pytest.raises(ValueError):
        direction_loss(torch.zeros(3, 4), torch.zeros(3, 5), torch.ones(3))
    with pytest.raises(ValueError):
        direction_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2))
    with pytest.raises(ValueError):
        direction_loss(torch.zeros(3, 4, 1), torch.zeros(3, 4, 1), torch.ones(3))


# --------------------------------------------------------------------------------------
# distribution_loss: values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("n,d,v", list(itertools.product(NS, DS, VS)))
def test_distribution_loss_matches_reference(n, d, v, chunk, reverse):
    for dtype, T, wkind in itertools.product(
        [torch.float32, torch.bfloat16], [1.0, 2.5], ["uniform", "random"]
    ):
        s, t, E, w = make_inputs(n, d, v, dtype, weights=wkind)
        out = distribution_loss(s, t, E, w, temperature=T, reverse=reverse, chunk_size=chunk)
        assert out.dim() == 0 and out.dtype == torch.float32
        ref = ref_distribution(s, t, E, w, T, reverse)
        # inputs (bf16 too) are exact in fp32, so fp32-math tolerances apply to the value
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5,
                                   msg=f"dtype={dtype} T={T} w={wkind}")


def test_distribution_loss_properties():
    s, t, E, w = make_inputs(7, 16, 37)
    for rev, c in itertools.product([False, True], [None, 3]):
        # KL(P||P) == 0 and KL >= 0
        same = distribution_loss(t, t, E, w, reverse=rev, chunk_size=c)
        assert abs(same.item()) < 1e-5
        assert distribution_loss(s, t, E, w, reverse=rev, chunk_size=c).item() > 0
    # forward and reverse differ in general
    a = distribution_loss(s, t, E, w, reverse=False, chunk_size=3)
    b = distribution_loss(s, t, E, w, reverse=True, chunk_size=3)
    assert not torch.isclose(a, b)


def test_distribution_loss_ignores_autocast():
    s, t, E, w = make_inputs(13, 16, 101)
    ref = ref_distribution(s, t, E, w, 1.0, False)
    for c in [None, 5]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = distribution_loss(s, t, E, w, chunk_size=c)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# distribution_loss: gradients
# --------------------------------------------------------------------------------------


def _grads(s, t, E, w, *, vocab_grad=True, **kw):
    s = s.clone().requires_grad_()
    E = E.clone().requires_grad_(vocab_grad)
    t = t.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = distribution_loss(s, t, E, w, **kw)
    (out * 0.37).backward()  # non-unit grad_output: backward must scale
    assert t.grad is None, "target must get no gradient"
    assert w.grad is None, "weights must get no gradient"
    if not vocab_grad:
        assert E.grad is None
    return out.detach(), s.grad, E.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", NS)
def test_chunked_gradients_equal_unchunked(n, reverse, dtype):
    d, v, T = 16, 37, 1.7
    s, t, E, w = make_inputs(n, d, v, dtype)
    _, gs_ref, ge_ref = _grads(s, t, E, w, temperature=T, reverse=reverse, chunk_size=None)
    # float64 reference gradients from the independent implementation
    s64 = s.double().requires_grad_()
    E64 = E.double().requires_grad_()
    (ref_distribution(s64, t, E64, w, T, reverse) * 0.37).backward()
    torch.testing.assert_close(gs_ref.double(), s64.grad, **tols(dtype))
    torch.testing.assert_close(ge_ref.double(), E64.grad, **tols(dtype))
    for chunk in [1, 3, 5]:
        _, gs, ge = _grads(s, t, E, w, temperature=T, reverse=reverse, chunk_size=chunk)
        assert gs.dtype == dtype and ge.dtype == dtype
        assert gs.shape == (n, d) and ge.shape == (v, d)
        torch.testing.assert_close(gs, gs_ref, **tols(dtype))
        torch.testing.assert_close(ge, ge_ref, **tols(dtype))
        torch.testing.assert_close(ge.double(), E64.grad, **tols(dtype))


@pytest.mark.parametrize("chunk", [None, 4])
def test_vocab_without_requires_grad_gets_none(chunk):
    s, t, E, w = make_inputs(7, 5, 11)
    _, gs, ge = _grads(s, t, E, w, vocab_grad=False, chunk_size=chunk)
    assert gs is not None and ge is None
    _, gs_full, _ = _grads(s, t, E, w, vocab_grad=True, chunk_size=chunk)
    torch.testing.assert_close(gs, gs_full)


@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_gradients_match_finite_differences_float64(reverse):
    """Directional derivatives by central differences (a fresh graph each time: the chunked
    Function scales its stored gradients in place, so it is backward-once, like fused kernels)."""
    s, t, E, w = make_inputs(5, 4, 7, torch.float64)
    kw = dict(temperature=1.3, reverse=reverse, chunk_size=2)
    gen = torch.Generator().manual_seed(7)

    def check(fn, inputs):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        (fn(*leaves) * 0.37).backward()  # a grad_output other than 1
        for _ in range(3):
            dirs = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in inputs]
            eps = 1e-6
            with torch.no_grad():
                plus = fn(*[x + eps * u for x, u in zip(inputs, dirs)])
                minus = fn(*[x - eps * u for x, u in zip(inputs, dirs)])
            numeric = 0.37 * (plus - minus).item() / (2 * eps)
            analytic = sum(float((leaf.grad * u).sum()) for leaf, u in zip(leaves, dirs))
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)

    # P is a constant by design, also wrt E, so a finite difference in E would see P move.
    # (1) wrt student with a random target, E requiring grad (the E-gradient path runs).
    E_live = E.clone().requires_grad_()
    check(lambda s_: distribution_loss(s_, t, E_live, w, **kw), (s,))
    # (2) wrt student and E with a zero target: P is uniform whatever E is.
    t0 = torch.zeros_like(t)
    check(lambda s_, E_: distribution_loss(s_, t0, E_, w, **kw), (s, E))


def test_chunked_backward_runs_once_and_says_so():
    s, t, E, w = make_inputs(5, 4, 7)
    s.requires_grad_()
    out = distribution_loss(s, t, E, w, chunk_size=2)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        out.backward()


@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize("vocab_grad", [False, True])
def test_distribution_loss_empty_is_connected_zero(chunk, vocab_grad):
    s = torch.randn(0, 8, requires_grad=True)
    E = torch.randn(11, 8, requires_grad=vocab_grad)
    out = distribution_loss(s, torch.randn(0, 8), E, torch.ones(0), chunk_size=chunk)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert s.grad is not None and s.grad.shape == (0, 8)
    if vocab_grad:
        assert E.grad is not None and torch.count_nonzero(E.grad) == 0
    else:
        assert E.grad is None


def test_no_grad_mode_returns_plain_value():
    s, t, E, w = make_inputs(7, 5, 11)
    s.requires_grad_()
    E.requires_grad_()
    with torch.no_grad():
        out = distribution_loss(s, t, E, w, chunk_size=3)
    assert not out.requires_grad
    torch.testing.assert_close(out, distribution_loss(s, t, E, w).detach())


def test_distribution_loss_validation():
    s, t, E, w = make_inputs(4, 5, 11)
    bad = [
        dict(target=torch.zeros(4, 6)),
        dict(vocab=torch.zeros(11, 6)),
        dict(vocab=torch.zeros(0, 5)),
        dict(weights=torch.ones(3)),
        dict(student=torch.zeros(4, 5, 1), target=torch.zeros(4, 5, 1)),
    ]
    for override in bad:
        args = dict(student=s, target=t, vocab=E, weights=w)
        args.update(override)
        with pytest.raises(ValueError):
            distribution_loss(args["student"], args["target"], args["vocab"], args["weights"])
    for kw in [dict(temperature=0.0), dict(temperature=-1.0), dict(chunk_size=0),
               dict(chunk_size=2.5), dict(chunk_size=True)]:
        with pytest.raises(ValueError):
            distribution_loss(s, t, E, w, **kw)


# --------------------------------------------------------------------------------------
# distribution_loss: memory behaviour (no timing)
# --------------------------------------------------------------------------------------


_MM_OPS = {"mm", "addmm", "addmm_", "bmm", "matmul", "baddbmm"}


class _Recorder(TorchDispatchMode):
    """Records the largest numel of any tensor an op produces, and counts matmuls."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.mm_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _MM_OPS:
            self.mm_calls += 1
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk", [4, 5])
def test_chunked_path_never_materialises_full_logits(chunk, reverse, dtype):
    n, d, v = 64, 8, 50  # N*V = 3200 dwarfs chunk*V (<= 250), V*d (400) and N*d (512)
    s, t, E, w = make_inputs(n, d, v, dtype)
    # Tensors of input size (student/grad: N*d; vocab/its fp32 copy/grad: V*d) are allowed,
    # and the logits of one chunk of student and target rows (2 chunk x V).
    bound = max(2 * chunk * v, v * d, n * d)
    assert n * v > bound

    def run(chunk_size):
        s_ = s.clone().requires_grad_()
        E_ = E.clone().requires_grad_()
        fwd, bwd = _Recorder(), _Recorder()
        with fwd:
            out = distribution_loss(s_, t, E_, w, reverse=reverse, chunk_size=chunk_size)
        with bwd:
            out.backward()
        return fwd, bwd

    fwd, bwd = run(chunk)
    assert fwd.max_numel <= bound, (fwd.max_numel, bound)
    assert bwd.max_numel <= bound, (bwd.max_numel, bound)
    n_chunks = math.ceil(n / chunk)
    # gradients are computed in the forward: 3 matmuls per chunk ([s; t] E^T, dz E, dz^T s),
    # none in the backward
    assert fwd.mm_calls == 3 * n_chunks
    assert bwd.mm_calls == 0

    fwd_ref, bwd_ref = run(None)  # the unchunked reference does hold N x V logits
    assert fwd_ref.max_numel >= n * v
    assert bwd_ref.max_numel >= n * v


def test_chunked_path_skips_gradient_work_when_not_needed():
    n, d, v, chunk = 13, 5, 11, 3
    s, t, E, w = make_inputs(n, d, v)
    n_chunks = math.ceil(n / chunk)
    for s_grad, e_grad, grad_mode, expected in [  # [s; t] E^T is one matmul
        (True, True, True, 3),
        (True, False, True, 2),
        (False, True, True, 2),
        (True, True, False, 1),
        (False, False, True, 1),
    ]:
        rec = _Recorder()
        s_ = s.clone().requires_grad_(s_grad)
        E_ = E.clone().requires_grad_(e_grad)
        with torch.set_grad_enabled(grad_mode), rec:
            distribution_loss(s_, t, E_, w, chunk_size=chunk)
        assert rec.mm_calls == expected * n_chunks, (s_grad, e_grad, grad_mode)


def test_direction_loss_over_several_chunks_leaves_inputs_untouched(monkeypatch):
    import basic_plugin.basic.losses as losses

    monkeypatch.setattr(losses, "DIRECTION_CHUNK", 4)  # 11 rows -> 3 chunks
    s, t, _, w = make_inputs(11, 6, 3, torch.float32)
    s_before, t_before = s.clone(), t.clone()
    s.requires_grad_()
    out = direction_loss(s, t, w)
    out.backward()
    assert torch.equal(s.detach(), s_before) and torch.equal(t, t_before)
    s64 = s_before.double().requires_grad_()
    ref = ref_direction(s64, t.double(), w.double())
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# basic_terms_fused: both terms, one student gradient buffer
# --------------------------------------------------------------------------------------


def _fused_grads(s, t, E, w, lam_das, lam_sds, *, vocab_grad=True, scale=0.37, **kw):
    """Fused terms and the gradients of ``scale * (das + sds)`` (a non-unit incoming gradient)."""
    s = s.clone().requires_grad_()
    E = E.clone().requires_grad_(vocab_grad)
    t = t.clone().requires_grad_()
    w = w.clone().requires_grad_()
    das, sds = basic_terms_fused(s, t, E, w, lam_das, lam_sds, **kw)
    ((das + sds) * scale).backward()
    assert t.grad is None and w.grad is None
    return das.detach(), sds.detach(), s.grad, E.grad


def _reference_grads(s, t, E, w, lam_das, lam_sds, T, reverse, vocab_grad, scale=0.37, eps=1e-6):
    """float64 autograd through the plain row formulas (``ref_direction`` / ``ref_distribution``)."""
    s64 = s.double().requires_grad_()
    E64 = E.double().requires_grad_(vocab_grad)
    das = lam_das * ref_direction(s64, t.double(), w.double(), eps=eps)
    sds = lam_sds * ref_distribution(s64, t, E64, w, T, reverse)
    ((das + sds) * scale).backward()
    return das.detach(), sds.detach(), s64.grad, E64.grad


@pytest.mark.parametrize("weights", ["random", "zero"])
@pytest.mark.parametrize("vocab_grad", [True, False])
@pytest.mark.parametrize("reverse,T", [(False, 1.0), (True, 1.7), (False, 0.6)])
@pytest.mark.parametrize("n,v,chunk", [(0, 11, 3), (1, 11, 1), (7, 37, 3), (13, 11, 5), (13, 37, 13)])
def test_fused_terms_and_gradients_match_float64_formulas(n, v, chunk, reverse, T, vocab_grad, weights):
    d = 5
    s, t, E, w = make_inputs(n, d, v, torch.float64)
    if weights == "zero":
        w = torch.zeros_like(w)
    lam_das, lam_sds = 0.8, 0.3
    das, sds, gs, ge = _fused_grads(s, t, E, w, lam_das, lam_sds, temperature=T, reverse=reverse,
                                    chunk_size=chunk, vocab_grad=vocab_grad)
    rd, rs, rgs, rge = _reference_grads(s, t, E, w, lam_das, lam_sds, T, reverse, vocab_grad)
    assert das.dtype == sds.dtype == torch.float64
    torch.testing.assert_close(das, rd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sds, rs, rtol=1e-10, atol=1e-12)
    assert gs.shape == (n, d)
    torch.testing.assert_close(gs, rgs, rtol=1e-9, atol=1e-12)
    if vocab_grad:
        torch.testing.assert_close(ge, rge, rtol=1e-9, atol=1e-12)
    else:
        assert ge is None
    if weights == "zero":
        assert das.item() == 0.0 and sds.item() == 0.0 and torch.count_nonzero(gs) == 0


@pytest.mark.parametrize("lam_das,lam_sds", [(1.0, 0.0), (0.0, 0.5), (0.0, 0.0), (2.5, 0.01)])
def test_fused_lambdas_weight_each_term(lam_das, lam_sds):
    s, t, E, w = make_inputs(7, 5, 11, torch.float64)
    das, sds, gs, ge = _fused_grads(s, t, E, w, lam_das, lam_sds, temperature=1.3, chunk_size=2)
    rd, rs, rgs, rge = _reference_grads(s, t, E, w, lam_das, lam_sds, 1.3, False, True)
    torch.testing.assert_close(das, rd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sds, rs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, rgs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ge, rge, rtol=1e-9, atol=1e-12)


def test_fused_at_lambda_sds_zero_computes_no_logits(monkeypatch):
    """lambda_sds 0 (the monitor and direction-only runs): no vocabulary logits at all, same values and
    gradients as the direction term alone (float64 reference), vocab gradient zero."""
    from basic_plugin.basic import losses

    def no_logits(*args, **kwargs):
        raise AssertionError("the distribution term was computed at lambda_sds 0")

    s, t, E, w = make_inputs(9, 5, 11, torch.float64)
    monkeypatch.setattr(losses, "_kl_rows_chunk", no_logits)
    das, sds, gs, ge = _fused_grads(s, t, E, w, 0.7, 0.0, chunk_size=4)
    monkeypatch.undo()
    rd, _, rgs, _ = _reference_grads(s, t, E, w, 0.7, 0.0, 1.0, False, True)
    assert sds.item() == 0.0 and torch.count_nonzero(ge) == 0
    torch.testing.assert_close(das, rd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, rgs, rtol=1e-9, atol=1e-12)


def test_fused_zero_student_rows_follow_the_eps_floor():
    s, t, E, w = make_inputs(6, 5, 11, torch.float64)
    s[2] = 0.0
    s[4] = 1e-9  # below eps: floored too
    t[3] = 0.0
    das, sds, gs, ge = _fused_grads(s, t, E, w, 1.0, 0.2, chunk_size=4)
    rd, rs, rgs, rge = _reference_grads(s, t, E, w, 1.0, 0.2, 1.0, False, True)
    assert torch.isfinite(gs).all()
    torch.testing.assert_close(das, rd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, rgs, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ge, rge, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n,chunk", [(13, 3), (13, 256), (40, 7)])
def test_fused_equals_the_separate_functions(n, chunk, reverse, dtype):
    """Logged values as ``lambda * direction_loss`` / ``lambda * distribution_loss``; gradients as
    autograd summing the two functions' gradients."""
    s, t, E, w = make_inputs(n, 16, 37, dtype)
    kw = dict(temperature=1.4, reverse=reverse, chunk_size=chunk)
    das, sds, gs, ge = _fused_grads(s, t, E, w, 1.0, 0.01, **kw)
    s2, E2 = s.clone().requires_grad_(), E.clone().requires_grad_()
    d2 = 1.0 * direction_loss(s2, t, w)
    q2 = 0.01 * distribution_loss(s2, t, E2, w, **kw)
    ((d2 + q2) * 0.37).backward()
    torch.testing.assert_close(das, d2.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sds, q2.detach(), rtol=1e-6, atol=1e-9)
    assert gs.dtype == dtype and ge.dtype == dtype
    torch.testing.assert_close(gs, s2.grad, **tols(dtype))
    torch.testing.assert_close(ge, E2.grad, **tols(dtype))


def test_fused_without_chunks_is_the_autograd_reference():
    s, t, E, w = make_inputs(7, 5, 11, torch.float64)
    das, sds, gs, ge = _fused_grads(s, t, E, w, 0.9, 0.4, temperature=0.8, chunk_size=None)
    rd, rs, rgs, rge = _reference_grads(s, t, E, w, 0.9, 0.4, 0.8, False, True)
    torch.testing.assert_close(das, rd)
    torch.testing.assert_close(sds, rs)
    torch.testing.assert_close(gs, rgs)
    torch.testing.assert_close(ge, rge)


def test_fused_terms_must_enter_the_loss_as_a_sum():
    s, t, E, w = make_inputs(7, 5, 11)
    s.requires_grad_()
    das, sds = basic_terms_fused(s, t, E, w, 1.0, 0.5, chunk_size=3)
    with pytest.raises(RuntimeError, match="different weights"):
        (das + 2.0 * sds).backward()
    # one lambda zero: the buffer holds one term, which can be used alone
    s.grad = None
    das, _ = basic_terms_fused(s, t, E, w, 1.0, 0.0, chunk_size=3)
    das.backward()
    s64 = s.detach().double().requires_grad_()
    ref_direction(s64, t, w, eps=1e-6).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_fused_backward_runs_once_and_says_so():
    s, t, E, w = make_inputs(5, 4, 7)
    s.requires_grad_()
    das, sds = basic_terms_fused(s, t, E, w, chunk_size=2)
    (das + sds).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        (das + sds).backward()


@pytest.mark.parametrize("vocab_grad", [False, True])
def test_fused_empty_is_connected_zero(vocab_grad):
    s = torch.randn(0, 8, requires_grad=True)
    E = torch.randn(11, 8, requires_grad=vocab_grad)
    das, sds = basic_terms_fused(s, torch.randn(0, 8), E, torch.ones(0), 1.0, 0.01, chunk_size=4)
    assert das.item() == 0.0 and sds.item() == 0.0 and das.requires_grad and sds.requires_grad
    (das + sds).backward()
    assert s.grad is not None and s.grad.shape == (0, 8)
    if vocab_grad:
        assert E.grad is not None and torch.count_nonzero(E.grad) == 0
    else:
        assert E.grad is None


def test_fused_no_grad_and_validation():
    s, t, E, w = make_inputs(7, 5, 11)
    s.requires_grad_()
    with torch.no_grad():
        das, sds = basic_terms_fused(s, t, E, w, 1.0, 0.01, chunk_size=3)
    assert not das.requires_grad and not sds.requires_grad
    for kw in [dict(lambda_das=float("nan")), dict(lambda_sds=True), dict(lambda_sds="0.1"),
               dict(temperature=0.0), dict(chunk_size=0), dict(chunk_size=2.5)]:
        with pytest.raises(ValueError):
            basic_terms_fused(s, t, E, w, **kw)
    with pytest.raises(ValueError):
        basic_terms_fused(s, t, torch.zeros(11, 6), w)
    with pytest.raises(ValueError):
        basic_terms_fused(s, t, E, torch.ones(3))


class _AllocRecorder(TorchDispatchMode):
    """Shapes of the tensors ops produce on new storage (not views or in-place results), and matmuls."""

    def __init__(self):
        super().__init__()
        self.new_shapes = []
        self.mm_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _MM_OPS:
            self.mm_calls += 1
        inputs = {a.untyped_storage()._cdata for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage()._cdata not in inputs:
                self.new_shapes.append(tuple(o.shape))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_one_student_sized_buffer_in_the_fused_path_only(fused, dtype):
    """The fused path allocates exactly one N x d tensor (the gradient it returns); the two
    separate functions need three (one gradient each, and autograd's sum of the two)."""
    n, d, v, chunk = 60, 9, 23, 4  # N x d is a shape nothing else has
    s, t, E, w = make_inputs(n, d, v, dtype)
    s.requires_grad_()
    E.requires_grad_()
    rec = _AllocRecorder()
    with rec:
        if fused:
            das, sds = basic_terms_fused(s, t, E, w, 1.0, 0.01, chunk_size=chunk)
            (das + sds).backward()
        else:
            (direction_loss(s, t, w) + 0.01 * distribution_loss(s, t, E, w, chunk_size=chunk)).backward()
    student_sized = rec.new_shapes.count((n, d))
    if fused:
        assert student_sized == 1
        assert rec.mm_calls == 3 * math.ceil(n / chunk)  # [s; t] E^T, dz E, dz^T s per chunk
        assert max(a * b for a, b in (x for x in rec.new_shapes if len(x) == 2)) <= max(2 * chunk * v, v * d, n * d)
    else:
        assert student_sized >= 3


def test_fused_keeps_no_input_alive_until_backward():
    """Nothing batch-sized is saved for the backward: a student / target that only the loss
    uses are freed as soon as the caller drops them."""
    import weakref

    base, t0, E, w = make_inputs(9, 5, 11)
    base.requires_grad_()
    student = base.clone()  # a non-leaf, as the gathered projector rows in training
    target = t0.clone()
    refs = weakref.ref(student), weakref.ref(target)
    das, sds = basic_terms_fused(student, target, E, w, 1.0, 0.01, chunk_size=4)
    del student, target
    assert refs[0]() is None and refs[1]() is None
    (das + sds).backward()
    assert base.grad is not None and base.grad.shape == (9, 5)
