"""Evaluation of a trained mini-LLaVA: zero-shot accuracy, the per-layer lens, greedy captions, statistics.

Zero-shot classification: for each held-out image, the 10 class captions
("A photo of a sneaker.", ...) are scored by the model's log-likelihood, summed over the
caption's tokens and the template's end separator, exactly as they are tokenized in training
(LLaVA's ``plain`` template: ``[BOS] <image> caption \\n``); the prediction is the most likely
caption. The image prefix is shared: it runs once per image (with ``use_cache``), and the 10
candidates run as one batch on the cached keys/values (:func:`score_shared_prefix`), which is
equal to scoring each candidate from scratch (:func:`score_naive`, tested to float tolerance).
The same prefix pass gives the hidden states the lens needs (:class:`basic_plugin.lab.lens.LayerLens`).

Calibrated (PMI) accuracy: each caption's score minus its log-likelihood without the image
(``[BOS] caption \n``, :func:`caption_prior`), so that a model that simply likes some class
names (every model here says "dress" or "shirt" far too often) is not rewarded for it; the
raw score is reported too, with both confusion matrices.

Statistics: Wilson 95% intervals for each accuracy, McNemar's exact test on the discordant
pairs (the two models see the same images), and a paired bootstrap interval of the
difference.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

Z95 = 1.959963984540054


# -- statistics -------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n``."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b``, ``c`` = discordant pairs (only A right, only B right)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar_sample_size(p_discordant: float, delta: float = 0.02, alpha: float = 0.05, power: float = 0.8) -> int:
    """Pairs needed for McNemar's test to detect an accuracy difference ``delta`` (Connor's approximation).

    ``p_discordant``: expected share of items on which exactly one model is right.
    n = (z_{1-alpha/2} sqrt(p_d) + z_{power} sqrt(p_d - delta^2))^2 / delta^2.
    """
    from statistics import NormalDist

    if not 0 < delta * delta < p_discordant <= 1:
        raise ValueError("need 0 < delta^2 < p_discordant <= 1")
    z_a = NormalDist().inv_cdf(1 - alpha / 2)
    z_b = NormalDist().inv_cdf(power)
    return math.ceil((z_a * math.sqrt(p_discordant) + z_b * math.sqrt(p_discordant - delta * delta)) ** 2 / delta ** 2)


def bootstrap_means(diffs, iters: int = 10000, seed: int = 0):
    """Sorted means of ``iters`` resamples of the columns of ``diffs`` (S, n): each draw picks n column
    (item) indices with replacement (``default_rng(seed)``), the same for every row, and averages the
    picked entries over rows and columns. Drawn in chunks (the same stream as one draw), so memory
    stays near 2M indices whatever n and iters are."""
    import numpy as np

    diffs = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    n = diffs.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty(iters, dtype=np.float64)
    step = max(1, 2_000_000 // max(1, n))
    for start in range(0, iters, step):
        picks = rng.integers(0, n, size=(min(step, iters - start), n))
        out[start:start + picks.shape[0]] = sum(row[picks].mean(axis=1) for row in diffs) / diffs.shape[0]
    return np.sort(out)


def percentile_interval(stats, level: float = 0.95) -> Tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` order statistics of sorted ``stats``."""
    iters = len(stats)
    return (float(stats[int(math.floor((1 - level) / 2 * iters))]),
            float(stats[min(iters - 1, int(math.ceil((1 + level) / 2 * iters)) - 1)]))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iters: int = 10000, seed: int = 0,
                     level: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of ``mean(b) - mean(a)`` over paired resamples of the items (bools or numbers)."""
    import numpy as np

    if len(a) != len(b) or not len(a):
        raise ValueError("need two paired, non-empty outcome lists")
    return percentile_interval(bootstrap_means(np.asarray(b, float) - np.asarray(a, float), iters, seed), level)


def compare_paired(a: Sequence[bool], b: Sequence[bool], *, iters: int = 10000, seed: int = 0) -> dict:
    """Accuracy of each with Wilson CI, the difference b - a with a bootstrap CI, McNemar's p."""
    n = len(a)
    ka, kb = sum(map(bool, a)), sum(map(bool, b))
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return {"n": n, "acc_a": ka / n, "ci_a": wilson_interval(ka, n), "acc_b": kb / n, "ci_b": wilson_interval(kb, n),
            "diff": (kb - ka) / n, "diff_ci": paired_bootstrap(a, b, iters, seed), "only_a": only_a, "only_b": only_b,
            "mcnemar_p": mcnemar_exact(only_a, only_b)}


def compare_seeds(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], *, iters: int = 10000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """B vs A over several training seeds, paired by image within each seed (same images in every seed).

    ``a[s][i]``, ``b[s][i]``: whether model A / B (trained with seed ``s``) got image ``i`` right.
    Returns the per-seed accuracies and differences, how many seeds go each way, the pooled
    difference (mean over all image x seed pairs) with a percentile interval from resampling the
    images (the same resampled images in every seed, so an image that is hard for every seed counts
    once per draw), and the mean of the per-seed differences with a t interval over seeds (it
    reflects the seed-to-seed spread, which the image resampling does not).
    """
    import numpy as np

    A = np.asarray(a, dtype=np.float64)
    B = np.asarray(b, dtype=np.float64)
    if A.shape != B.shape or A.ndim != 2 or A.size == 0:
        raise ValueError(f"need two equal (seeds, images) outcome tables; got {A.shape} and {B.shape}")
    seeds, n = A.shape
    per_seed = (B - A).mean(axis=1)
    lo, hi = percentile_interval(bootstrap_means(B - A, iters, seed), level)  # images resampled, shared by seeds
    out = {"seeds": seeds, "n_per_seed": n, "acc_a": A.mean(axis=1).tolist(), "acc_b": B.mean(axis=1).tolist(),
           "per_seed_diff": per_seed.tolist(), "diff": float(per_seed.mean()), "diff_ci": (lo, hi),
           "seeds_ahead": int((per_seed > 0).sum()), "seeds_behind": int((per_seed < 0).sum()),
           "seeds_tied": int((per_seed == 0).sum())}
    if seeds > 1:
        from math import sqrt

        t = student_t_quantile((1 + level) / 2, seeds - 1)
        half = t * float(per_seed.std(ddof=1)) / sqrt(seeds)
        out["seed_mean_ci"] = (out["diff"] - half, out["diff"] + half)
    return out


def student_t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on the exact CDF via the
    regularised incomplete beta function, computed by its continued fraction)."""
    if not 0 < q < 1 or df < 1:
        raise ValueError("need 0 < q < 1 and df >= 1")

    def cdf(t: float) -> float:
        x = df / (df + t * t)
        tail = 0.5 * _betainc(df / 2, 0.5, x)
        return 1 - tail if t > 0 else tail

    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (Numerical Recipes' continued fraction, Lentz's method)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for k in (0, 1):
            if k == 0:
                num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
            else:
                num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


# -- candidate scoring -----------------------------------------------------------------------
def candidate_ids(tokenizer, captions: Sequence[str], sep: str = "\n") -> Tuple[List[int], List[List[int]]]:
    """``(prefix ids, [caption ids])`` as LLaVA's ``plain`` template tokenizes ``<image>caption<sep>``.

    The prefix ids end with ``IMAGE_TOKEN_INDEX`` (and start with BOS when the tokenizer adds one).
    """
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    prefix = None
    out = []
    for text in captions:
        ids = tokenizer_image_token("<image>" + text + sep, tokenizer)
        at = ids.index(IMAGE_TOKEN_INDEX) + 1
        if prefix is None:
            prefix = ids[:at]
        elif ids[:at] != prefix:
            raise ValueError("captions tokenize to different prefixes")
        out.append(ids[at:])
    return prefix, out


def _lm(model):
    return model.get_model(), model.lm_head


def score_naive(model, prefix_embeds, cand: Sequence[Sequence[int]]):
    """``(B, C)`` summed log-probabilities, each candidate run from scratch after the prefix."""
    import torch

    body, head = _lm(model)
    embed = model.get_input_embeddings()
    batch, p = prefix_embeds.shape[:2]
    scores = torch.zeros(batch, len(cand), dtype=torch.float64)
    with torch.no_grad():
        for b in range(batch):
            for c, ids in enumerate(cand):
                ids_t = torch.tensor(ids, device=prefix_embeds.device)
                x = torch.cat([prefix_embeds[b:b + 1], embed(ids_t).unsqueeze(0)], dim=1)
                hidden = body(inputs_embeds=x, use_cache=False, return_dict=True).last_hidden_state
                logp = torch.log_softmax(head(hidden[0, p - 1:p - 1 + len(ids)]).float(), dim=-1)
                scores[b, c] = logp.gather(1, ids_t.unsqueeze(1)).sum().double()
    return scores


def _common_prefix(seqs: Sequence[Sequence[int]]) -> List[int]:
    first = list(seqs[0])
    n = min(len(s) for s in seqs)
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return first[:k]


def score_shared_prefix(model, prefix_embeds, cand: Sequence[Sequence[int]], *, output_hidden_states: bool = False):
    """``(B, C)`` summed log-probabilities of every candidate after each prefix, prefix run once.

    The prefix batch (B, P, d), followed by the tokens all candidates start with ("A photo of"),
    runs once with ``use_cache``; the B x C remaining candidate parts (right-padded: causal
    attention keeps padding out of every real position) run as one batch on the repeated
    keys/values. Returns ``(scores, hidden_states of the prefix pass or None)``; the hidden
    states cover the prefix and the common tokens.
    """
    import torch

    body, head = _lm(model)
    embed = model.get_input_embeddings()
    batch, p = prefix_embeds.shape[:2]
    device = prefix_embeds.device
    ncand = len(cand)
    common = _common_prefix(cand)
    if len(common) == min(len(c) for c in cand):  # keep at least one own token per candidate
        common = common[:-1]
    rest = [list(c[len(common):]) for c in cand]
    width = max(len(r) for r in rest)
    ids = torch.zeros(ncand, width, dtype=torch.long, device=device)
    valid = torch.zeros(ncand, width, dtype=torch.bool, device=device)
    for c, row in enumerate(rest):
        ids[c, :len(row)] = torch.tensor(row, device=device)
        valid[c, :len(row)] = True
    with torch.no_grad():
        x = prefix_embeds
        if common:
            common_t = torch.tensor(common, device=device)
            x = torch.cat([prefix_embeds, embed(common_t).unsqueeze(0).expand(batch, -1, -1)], dim=1)
        out = body(inputs_embeds=x, use_cache=True, output_hidden_states=output_hidden_states, return_dict=True)
        # log-probs of the common tokens (predicted from positions p-1 .. p+len(common)-2) and of each first own token
        logp = torch.log_softmax(head(out.last_hidden_state[:, p - 1:]).float(), dim=-1)   # (B, 1+len(common), V)
        score = torch.zeros(batch, dtype=torch.float64, device=device)
        for j, tok in enumerate(common):
            score = score + logp[:, j, tok].double()
        score = score.unsqueeze(1) + logp[:, -1][:, ids[:, 0]].double()                    # (B, C)
        if width > 1:
            past = tuple((k.repeat_interleave(ncand, 0), v.repeat_interleave(ncand, 0)) for k, v in out.past_key_values)
            xs = embed(ids[:, :-1]).repeat(batch, 1, 1)                                       # (B*C, W-1, d)
            mask = torch.ones(batch * ncand, x.shape[1] + width - 1, dtype=torch.long, device=device)
            # use_cache=True: transformers 4.37 turns the legacy tuple into a Cache only then
            hidden = body(inputs_embeds=xs, past_key_values=past, attention_mask=mask, use_cache=True,
                          return_dict=True).last_hidden_state
            logp_rest = torch.log_softmax(head(hidden).float(), dim=-1)                      # (B*C, W-1, V)
            target = ids[:, 1:].repeat(batch, 1)
            got = logp_rest.gather(2, target.unsqueeze(-1)).squeeze(-1)
            got = got * valid[:, 1:].repeat(batch, 1)
            score = score + got.sum(dim=1).view(batch, ncand).double()
    return score.cpu(), (out.hidden_states if output_hidden_states else None)


def greedy_caption(model, tokenizer, prefix_embeds, *, max_new_tokens: int = 16, stop: Sequence[int] = ()) -> List[str]:
    """Greedy continuation of each prefix (with the KV cache), up to a stop token; decoded, stripped."""
    import torch

    body, head = _lm(model)
    embed = model.get_input_embeddings()
    stop = set(stop) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    texts = []
    with torch.no_grad():
        for b in range(prefix_embeds.shape[0]):
            out = body(inputs_embeds=prefix_embeds[b:b + 1], use_cache=True, return_dict=True)
            past, last, ids = out.past_key_values, out.last_hidden_state[:, -1], []
            for _ in range(max_new_tokens):
                nxt = int(head(last).argmax(dim=-1))
                if nxt in stop:
                    break
                ids.append(nxt)
                out = body(inputs_embeds=embed(torch.tensor([[nxt]], device=prefix_embeds.device)),
                           past_key_values=past, use_cache=True, return_dict=True)
                past, last = out.past_key_values, out.last_hidden_state[:, -1]
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


# -- one trained model -----------------------------------------------------------------------
def caption_prior(model, tokenizer, prefix_ids: Sequence[int], cand: Sequence[Sequence[int]]):
    """Log-likelihood of each candidate caption without an image: ``[BOS] caption <sep>``, shape (C,).

    Without a BOS in the template (SmolLM2's tokenizer adds none), the caption is conditioned on
    the tokenizer's BOS token, or its EOS token: the start of a text.
    """
    import torch
    from llava.constants import IMAGE_TOKEN_INDEX

    text = [t for t in prefix_ids if t != IMAGE_TOKEN_INDEX]
    if not text:  # a tokenizer that adds no BOS (SmolLM2): condition on its start (or end) of text token
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has no BOS or EOS token to condition the caption prior on")
        text = [start]
    embeds = model.get_model().embed_tokens(torch.tensor([text], dtype=torch.long, device=model.device))
    scores, _ = score_shared_prefix(model, embeds, cand)
    return scores[0]


def confusion(labels: Sequence[int], preds: Sequence[int], classes: int) -> List[List[int]]:
    """``m[true][predicted]`` counts."""
    m = [[0] * classes for _ in range(classes)]
    for y, p in zip(labels, preds):
        m[int(y)][int(p)] += 1
    return m


def evaluate_model(run_dir, model_base, data: Dict[str, str], *, captions: Sequence[str], n_test: Optional[int] = None,
                   n_lens: int = 30, n_caption_test: int = 4, batch: int = 8, progress: bool = True,
                   desc: str = "eval", on_progress: Optional[Callable[[int], None]] = None,
                   split: str = "test") -> dict:
    """Zero-shot accuracy (raw and calibrated) on ``data[split]`` (``test`` or ``val``), lens on its first
    ``n_lens`` images, captions of the photos.

    ``on_progress(k)`` (instead of a progress bar) is called with the number of images just done.
    Returns a JSON-able dict: per-item predictions and correctness, the lens summary, captions.
    """
    import torch
    from tqdm.auto import tqdm

    from basic_plugin.lab.lens import LayerLens, load_llava, meaningful_token_mask, normalized_vocabulary, pixel_batch, prefix_embeds
    from basic_plugin.host.records import load_records

    tokenizer, model, processor = load_llava(run_dir, model_base)
    folder = Path(data["image_folder"])
    records = load_records(data[split], folder)
    if n_test is not None:
        records = records[:n_test]
    photos_path = Path(data["photos"])
    photo_records = load_records(photos_path, folder) if photos_path.is_file() and json.loads(photos_path.read_text()) else []
    chosen = photo_records + records[:n_caption_test]
    prefix_ids, cand = candidate_ids(tokenizer, captions)
    vocab = normalized_vocabulary(model.get_input_embeddings().weight)
    lens = LayerLens(vocab, meaningful_token_mask(tokenizer, vocab.shape[0]), tokenizer)
    bar = tqdm(total=len(records) + len(chosen), desc=desc, unit="img", disable=not progress or on_progress is not None)

    def advance(k: int) -> None:
        bar.update(k)
        if on_progress is not None:
            on_progress(k)

    preds, labels, true_nll, all_scores = [], [], [], []
    with torch.no_grad():
        prior = caption_prior(model, tokenizer, prefix_ids, cand)
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            pixels = pixel_batch([folder / r["image"] for r in chunk], processor, model.config)
            embeds, mask = prefix_embeds(model, tokenizer, pixels)
            if embeds.shape[1] != len(prefix_ids) - 1 + int(mask[0].sum()):
                raise AssertionError("prefix embedding length differs from the tokenized prefix")
            want_lens = start < n_lens
            scores, hidden = score_shared_prefix(model, embeds, cand, output_hidden_states=want_lens)
            if want_lens:
                keep = min(len(chunk), n_lens - start)
                lens.add([h[:keep, :mask.shape[1]] for h in hidden], mask[:keep])
            preds += scores.argmax(dim=1).tolist()
            labels += [int(r["label"]) for r in chunk]
            all_scores += scores.tolist()
            # held-out caption loss of the true caption, nats per token (the training loss on unseen images)
            true_nll += [-float(scores[i, int(r["label"])]) / len(cand[int(r["label"])]) for i, r in enumerate(chunk)]
            advance(len(chunk))
        samples = []
        nl = tokenizer("\n", add_special_tokens=False).input_ids
        for start in range(0, len(chosen), batch):
            chunk = chosen[start:start + batch]
            pixels = pixel_batch([folder / r["image"] for r in chunk], processor, model.config)
            embeds, _ = prefix_embeds(model, tokenizer, pixels)
            for r, text in zip(chunk, greedy_caption(model, tokenizer, embeds, stop=nl[-1:])):
                samples.append({"id": r["id"], "image": r["image"], "reference": r["conversations"][1]["value"],
                                "generated": text})
            advance(len(chunk))
    bar.close()
    correct = [p == y for p, y in zip(preds, labels)]
    prior_list = prior.tolist()
    calibrated = [max(range(len(row)), key=lambda c: row[c] - prior_list[c]) for row in all_scores]
    calibrated_correct = [p == y for p, y in zip(calibrated, labels)]
    return {"n": len(records), "split": split, "accuracy": sum(correct) / max(1, len(correct)),
            "calibrated_accuracy": sum(calibrated_correct) / max(1, len(calibrated_correct)),
            "calibrated_predictions": calibrated, "calibrated_correct": calibrated_correct, "prior_scores": prior_list,
            "confusion": confusion(labels, preds, len(cand)),
            "calibrated_confusion": confusion(labels, calibrated, len(cand)),
            "predictions": preds, "labels": labels,
            "correct": correct, "true_nll": true_nll, "scores": all_scores, "ids": [r["id"] for r in records], "lens": lens.summary() if lens.per_image else None,
            "captions": samples, "total_images": len(records) + len(chosen)}


def evaluation_worker(key: str, kwargs: dict, threads: int, queue) -> None:
    """Process entry (``multiprocessing`` spawn): evaluate with ``threads`` torch threads, report through ``queue``.

    Puts ``("progress", key, k)`` as images finish, then ``("done", key, result)`` or ``("error", key, traceback)``.
    """
    import traceback

    import torch

    try:
        torch.set_num_threads(max(1, int(threads)))
        result = evaluate_model(**kwargs, on_progress=lambda k: queue.put(("progress", key, k)))
        queue.put(("done", key, result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", key, traceback.format_exc()))
