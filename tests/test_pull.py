"""lab/pull.py: per-term projector gradients through the plugin forward, against float64 references
written out from the paper's formulas (uniform patch weights, so a_i = 1 / tokens of the image)."""
import copy
import json

import pytest
import torch

from tests.test_channels import projector_checkpoint

DEPTH = 2


@pytest.fixture(scope="module")
def tiny_run(tiny_llava, tiny_data_plain, tmp_path_factory):
    from basic_plugin.host.forward import with_plugin_forward
    from basic_plugin.lab.lens import load_llava
    from basic_plugin.lab.pull import caption_batch
    from llava.model import LlavaLlamaForCausalLM

    run = projector_checkpoint(tiny_llava, tmp_path_factory.mktemp("pull") / "run")
    tok, model, proc = load_llava(run, tiny_llava["lm"], model_class=with_plugin_forward(LlavaLlamaForCausalLM))
    data_json, folder = tiny_data_plain
    records = json.loads(open(data_json).read())[:6]
    batches = [caption_batch(records[i:i + 3], tok, proc, model.config, folder) for i in (0, 3)]
    return run, model, batches


def reference_gradients(model, batches, lambda_das, lambda_sds):
    """float64: gradients of the caption loss (LLaVA's forward, no plugin bound) and of
    lambda_das * mean_b mean_i (2 - 2 cos(v_i, vhat_i)) and lambda_sds * mean_b mean_i KL(P_i || Q_i),
    P / Q = softmax over the input-embedding vocabulary of vhat / v, vhat = sum_l l^2 h_l / sum_l l^2."""
    from basic_plugin.host.binding import bind
    from basic_plugin.lab.pull import image_rows_and_states

    bind(model, [])
    params = list(model.get_model().mm_projector.parameters())
    lm = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for batch in batches:
        for acc, g in zip(lm, torch.autograd.grad(model(**batch).loss, params)):
            acc += g.double() / len(batches)
    proj64 = copy.deepcopy(model.get_model().mm_projector).double()
    vocab = model.get_input_embeddings().weight.detach().double()
    das_total = sds_total = 0
    for batch in batches:
        with torch.no_grad():
            rows, hidden = image_rows_and_states(model, batch)
            features = model.get_model().get_vision_tower()(batch["images"]).double()
        weights = [l * l for l in range(1, DEPTH + 1)]
        vhat = sum(w * hidden[l].double() for l, w in zip(range(1, DEPTH + 1), weights)) / sum(weights)
        v = proj64(features)  # (B, m, d), the image rows in order
        das = sds = 0
        for b in range(v.shape[0]):
            t = vhat[b][rows[b]]
            das = das + (2 - 2 * torch.nn.functional.cosine_similarity(v[b], t, dim=-1)).mean()
            p = torch.log_softmax(t @ vocab.T, dim=-1)
            q = torch.log_softmax(v[b] @ vocab.T, dim=-1)
            sds = sds + (p.exp() * (p - q)).sum(-1).mean()
        das_total = das_total + lambda_das * das / v.shape[0] / len(batches)
        sds_total = sds_total + lambda_sds * sds / v.shape[0] / len(batches)
    return {"lm": lm, "das": list(torch.autograd.grad(das_total, list(proj64.parameters()), retain_graph=True)),
            "sds": list(torch.autograd.grad(sds_total, list(proj64.parameters())))}


def test_term_gradients_match_float64_references(tiny_run):
    from basic_plugin.lab.pull import term_gradients

    _, model, batches = tiny_run
    got = term_gradients(model, batches, lambda_das=0.7, lambda_sds=40.0,  # KL is small at a random projector
                         overrides={"basic_depth": DEPTH, "basic_patch_weights": "uniform"})
    want = reference_gradients(model, batches, 0.7, 40.0)
    for name in ("lm", "das", "sds"):
        g, r = torch.cat([x.flatten() for x in got[name]]), torch.cat([x.flatten() for x in want[name]])
        assert r.norm() > 0 and ((g - r).norm() / r.norm()).item() < 1e-4, name


def test_pulls_and_the_command(tiny_run, tiny_llava, tiny_data_plain, tmp_path):
    from basic_plugin.lab.pull import main, pulls

    run, model, batches = tiny_run
    r = pulls(model, batches, lambda_das=1.0, lambda_sds=0.0, overrides={"basic_depth": DEPTH}, top=3)
    assert r["norm_sds"] == 0.0 and r["norm_das"] > 0 and -1 <= r["cos_das_lm"] <= 1
    assert r["das_over_lm"] == pytest.approx(r["norm_das"] / r["norm_lm"]) and len(r["top_channels"]) == 3
    assert 0 < r["das_top_share"] < 1 and 0 < r["lm_top_share"] < 1
    data_json, folder = tiny_data_plain
    out = tmp_path / "p.json"
    assert main(["--model-path", str(run), "--model-base", str(tiny_llava["lm"]), "--data", str(data_json),
                 "--image-folder", str(folder), "--batches", "2", "--batch-size", "3",
                 "--basic-flags", "--basic_depth 2 --basic_lambda_sds 0", "--top", "3", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())[str(run)]
    assert saved["cos_das_lm"] == pytest.approx(r["cos_das_lm"], rel=1e-5, abs=1e-7)
    assert saved["top_channels"] == r["top_channels"] and saved["lambda_das"] == 1.0 and saved["norm_sds"] == 0.0
    assert len(saved["massive_channels"]) == 0  # a random tiny LLM has no channel at 10x the median


def test_where_the_direction_term_pulls_with_channels_dropped(tiny_run, tiny_llava):
    """With --basic_drop_channels N the direction term's pull on those channels is zero, and its own top
    channels (by gradient energy of the projector's output layer, written out here) are elsewhere."""
    from transformers import AutoTokenizer

    from basic_plugin.basic.channels import channel_statistic, choose_channels, probe_ids, probe_states
    from basic_plugin.lab.pull import pulls, term_gradients

    _, model, batches = tiny_run
    tok = AutoTokenizer.from_pretrained(tiny_llava["lm"], use_fast=False)
    flags = {"basic_depth": DEPTH, "basic_drop_channels": "4"}
    r = pulls(model, batches, lambda_das=1.0, lambda_sds=0.0, overrides=flags, top=3, tokenizer=tok)
    dropped = choose_channels(channel_statistic(probe_states(model, probe_ids(tok), DEPTH)), "4")
    grads = term_gradients(model, batches, lambda_das=1.0, lambda_sds=0.0, overrides=flags, tokenizer=tok)
    weight, bias = grads["das"][-2:]
    per_channel = weight.pow(2).sum(1) + bias.pow(2)
    assert per_channel[dropped].abs().max().item() < 1e-25 * per_channel.max().item()
    assert r["das_gradient_top"] == torch.topk(per_channel, 3).indices.tolist()
    assert r["das_gradient_top_share"] == pytest.approx((torch.topk(per_channel, 3).values.sum() /
                                                          per_channel.sum()).item(), rel=1e-6)
    assert not set(r["das_gradient_top"]) & set(dropped)


def test_basic_flags_are_parsed_and_checked():
    from basic_plugin.lab.pull import parse_basic_flags

    assert parse_basic_flags("--basic_depth 7 --basic_patch_weights uniform --basic_lambda_das 0.3") == \
        {"basic_depth": 7, "basic_patch_weights": "uniform", "basic_lambda_das": 0.3}
    with pytest.raises(ValueError, match="unknown --basic_dept"):
        parse_basic_flags("--basic_dept 7")
    with pytest.raises(ValueError, match="pairs"):
        parse_basic_flags("--basic_depth")
