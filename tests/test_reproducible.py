"""BASIC is bit-reproducible on CPU: the same inputs give the same bits, run after run.

Exact equality (``torch.equal``, ``==`` on the logged floats), with several torch threads,
so that an op whose float result depends on the order its threads finish (e.g.
``index_put_(accumulate=True)`` with repeated indices, which this torch runs in parallel on
CPU once an op has about 32K elements) would show up. The model is wide enough (hidden 512,
128 image rows) for BASIC's per-row tensors to cross that size.
"""
import pytest
import torch

from basic_plugin.lab.tiny import build_tiny_llava, tiny_train_args
from tests.helpers import run_training
from tests.test_basic_objective import last_step, make_batch, make_model, ready

THREADS = 4
I = -200
# 8 samples, one image each (16 rows), text before and after it: 128 image rows
SAMPLES = [[1] + [5 + b] * b + [I] + [20 + (b + t) % 50 for t in range(24 + b)] + [2] for b in range(8)]
TERMS = ("lm_loss", "basic_das", "basic_sds")


@pytest.fixture(scope="module")
def wide_paths(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-repro"), layers=5, hidden=512, heads=8, kv_heads=2)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(before)


def one_step(paths, *, whole_model, **overrides):
    """Terms and gradients of one training forward/backward on a freshly built model."""
    model = make_model(paths, max_length=128)
    if not whole_model:  # stage 1: only the projector learns
        model.requires_grad_(False)
        for p in model.get_model().mm_projector.parameters():
            p.requires_grad_(True)
    model = ready(model, pretraining=not whole_model, **overrides)
    model.zero_grad(set_to_none=True)
    model(**make_batch(SAMPLES, seed=3)).loss.backward()
    terms = {k: v.clone() for k, v in last_step(model).terms.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads


@pytest.mark.parametrize("whole_model,overrides", [
    (False, {}),
    (True, {"basic_patch_weights": "sum1", "basic_lambda_sds": 0.5, "basic_sds_chunk_size": 48,
            "basic_query_chunk": 40, "basic_depth": 3}),
    (True, {"basic_patch_weights": "uniform", "basic_kl": "reverse", "basic_vocab": "lm_head", "basic_depth": 4}),
], ids=["stage1-raw", "whole-sum1-chunked", "whole-uniform-reverse-lm_head"])
def test_terms_and_gradients_are_bit_identical_across_runs(wide_paths, threads, whole_model, overrides):
    first = one_step(wide_paths, whole_model=whole_model, **overrides)
    second = one_step(wide_paths, whole_model=whole_model, **overrides)
    terms, grads = first
    assert set(TERMS) <= set(terms) and terms["basic_das"].item() > 0 and terms["basic_sds"].item() > 0
    for name in terms:
        assert torch.equal(terms[name], second[0][name]), (name, terms[name].item(), second[0][name].item())
    projector = [n for n in grads if "mm_projector" in n]
    assert projector and (not whole_model or "model.embed_tokens.weight" in grads)
    assert grads.keys() == second[1].keys()
    differ = [n for n in grads if not torch.equal(grads[n], second[1][n])]
    assert not differ, differ


def logged_steps(run):
    keys = ("loss", *TERMS, "basic_cos", "basic_weight_mass", "grad_norm")
    return [{k: e.get(k) for k in keys} for e in run["log_history"] if "loss" in e]


def test_two_training_runs_log_bit_identical_basic_terms(tiny_llava, tiny_data_plain, tmp_path):
    """python -m basic_plugin.train (seeded projector init), 3 steps with --basic True, twice."""
    runs = []
    for name in ("first", "second"):
        out = tmp_path / name
        args = tiny_train_args(tiny_llava, *tiny_data_plain, out, stage="pretrain", max_steps=3, batch=4,
                               extra=["--basic", "True", "--basic_lambda_sds", "0.5"])
        runs.append(run_training("tests._host_train", args, output_dir=out, env={"OMP_NUM_THREADS": "2"},
                                 timeout=300))
    first, second = (logged_steps(r) for r in runs)
    assert len(first) == 3 and all(step["basic_das"] and step["basic_das"] > 0 for step in first)
    assert first == second  # exact float equality of every logged value, step by step
    a, b = (torch.load(tmp_path / n / "mm_projector.bin", map_location="cpu", weights_only=True)
            for n in ("first", "second"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
