"""BASIC inside the real LLaVA forward, against an independent float64 reference.

The reference re-runs LLaVA's own splicing and the eager LLM with
``output_attentions``, finds the image rows by matching the projector output,
and evaluates the paper's formulas in float64 with plain loops.
"""
import types
from dataclasses import asdict

import pytest
import torch
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

from basic_plugin.basic import plugin as basic
from basic_plugin.basic.arguments import BasicArguments
from basic_plugin.host.integration import routed_llama_class
from basic_plugin.host.binding import bind, binding_of
from basic_plugin.host.plugins import load_plugins
from basic_plugin.lab.tiny import build_tiny_llava
from tests.helpers import collate_right_padded

I = -200
DEPTH = 2


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-basic"), layers=4)


def tiny_tokenizer(paths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(paths["lm"], use_fast=False)


def make_model(paths, attn="sdpa", padding_side="right", max_length=64):
    load_plugins()
    torch.manual_seed(0)
    model = routed_llama_class(LlavaLlamaForCausalLM, LlavaMistralForCausalLM).from_pretrained(
        paths["lm"], attn_implementation=attn)
    margs = types.SimpleNamespace(
        vision_tower=str(paths["vision"]), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_projector_type="mlp2x_gelu", mm_patch_merge_type="flat")
    model.get_model().initialize_vision_modules(model_args=margs)
    model.config.tokenizer_padding_side = padding_side
    model.config.tokenizer_model_max_length = max_length
    torch.manual_seed(1)
    for p in model.get_model().mm_projector.parameters():  # a projector that is not near zero
        torch.nn.init.normal_(p, std=0.3)
    return model


def ready(model, pretraining=False, tokenizer=None, **overrides):
    args = types.SimpleNamespace(**{**asdict(BasicArguments()), "basic": True, "basic_depth": DEPTH,
                                    "tune_mm_mlp_adapter": pretraining, **overrides})
    bind(model, [o for o in [basic.llava_objective(model=model, tokenizer=tokenizer, training_args=args,
                                                   data_args=None)] if o is not None])
    model.train()
    return model


def last_step(model):
    """What the host's forward recorded for the model's last training batch."""
    return binding_of(model).last_step


def make_batch(samples, n_images=None, seed=0):
    ids, mask = collate_right_padded(samples)
    labels = ids.clone()
    labels[ids == I] = -100
    labels[~mask] = -100
    g = torch.Generator().manual_seed(seed)
    n = n_images or sum(max(1, s.count(I)) for s in samples)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, images=torch.randn(n, 3, 56, 56, generator=g))


BATCH = [[1, I, 5, 6, 7, 8, 2], [1, 9, I, 10, 11, 2], [1, 12, 13, 2], [1, I, 14, I, 15, 16, 2]]


def reference_terms(model, batch, *, depth, weights_mode, kl, temperature=1.0, drop=(), standardize=False):
    """float64 L_das and L_sds from the eager model's attentions, formulas written out.

    ``standardize``: each channel of the targets of all the batch's image rows to mean 0 and
    (population) std 1; ``drop``: those channels set to zero in v and in the target."""
    with torch.no_grad():
        feats = model.encode_images(batch["images"])
        _, _, mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
            batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"])
        base = MistralForCausalLM if isinstance(model, MistralForCausalLM) else LlamaForCausalLM
        out = base.forward(model, inputs_embeds=embeds, attention_mask=mask, labels=labels,
                                       output_attentions=True, output_hidden_states=True, return_dict=True)
    hs = [h.double() for h in out.hidden_states]
    att = [a.double() for a in out.attentions]
    E = model.get_input_embeddings().weight.detach().double()
    flat = feats.reshape(-1, feats.shape[-1])
    das_sum = sds_sum = 0.0
    n_samples = 0
    found = []  # (a_i, v_i, vhat_i) of every image row of the batch
    B, L = mask.shape
    for b in range(B):
        # image rows: positions whose input embedding equals some projector output row
        rows, blocks = [], []
        for s in range(L):
            if not mask[b, s]:
                continue
            hit = torch.nonzero((flat == embeds[b, s]).all(-1)).flatten()
            if hit.numel():
                rows.append(s)
        if not rows:
            continue
        n_samples += 1
        # contiguous blocks of image rows
        for s in rows:
            if blocks and s == blocks[-1][-1] + 1:
                blocks[-1].append(s)
            else:
                blocks.append([s])
        row_set = set(rows)
        a = {}
        for block in blocks:
            queries = [j for j in range(block[-1] + 1, L) if mask[b, j] and j not in row_set]
            for i in block:
                if weights_mode == "uniform":
                    a[i] = 1.0 / len(rows)
                    continue
                total = 0.0
                for layer in range(depth):
                    for j in queries:
                        total += float(att[layer][b, :, j, i].mean())
                a[i] = total / (depth * len(queries)) if queries else 0.0
        if weights_mode == "sum1":
            z = sum(a.values())
            a = {i: v / z for i, v in a.items()}
        w = [l * l for l in range(1, depth + 1)]
        for i in rows:
            t = sum(w[l - 1] * hs[l][b, i] for l in range(1, depth + 1)) / sum(w)
            found.append((a[i], hs[0][b, i].clone(), t))
    if standardize:
        ts = torch.stack([t for _, _, t in found])
        mean, std = ts.mean(0), ((ts - ts.mean(0)) ** 2).mean(0).sqrt()
        found = [(a_i, v, (t - mean) / std) for a_i, v, t in found]
    for a_i, v, t in found:
        for c in drop:
            v[c] = t[c] = 0.0
        das_sum += a_i * float(((v / v.norm() - t / t.norm()) ** 2).sum())
        logp = torch.log_softmax(E @ t / temperature, -1)
        logq = torch.log_softmax(E @ v / temperature, -1)
        if kl == "forward":
            kl_i = float((logp.exp() * (logp - logq)).sum())
        else:
            kl_i = float((logq.exp() * (logq - logp)).sum())
        sds_sum += a_i * kl_i
    return das_sum / n_samples, sds_sum / n_samples, float(out.loss)


@pytest.mark.parametrize("weights_mode,kl,temperature", [
    ("raw", "forward", 1.0), ("sum1", "reverse", 1.0), ("uniform", "forward", 2.0), ("raw", "reverse", 0.5)])
def test_terms_match_float64_reference(tiny_paths, weights_mode, kl, temperature):
    model = ready(make_model(tiny_paths, attn="sdpa"), basic_patch_weights=weights_mode, basic_kl=kl,
                  basic_temperature=temperature, basic_lambda_sds=0.5, basic_sds_chunk_size=5)
    eager = make_model(tiny_paths, attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = make_batch(BATCH)
    out = model(**batch)
    terms = last_step(model).terms
    das, sds, lm = reference_terms(eager, batch, depth=DEPTH, weights_mode=weights_mode, kl=kl,
                                   temperature=temperature)
    assert terms["basic_das"].item() == pytest.approx(das, rel=1e-4, abs=1e-7)
    assert terms["basic_sds"].item() == pytest.approx(0.5 * sds, rel=1e-4, abs=1e-7)
    assert terms["lm_loss"].item() == pytest.approx(lm, rel=1e-5)
    assert out.loss.item() == pytest.approx(lm + das + 0.5 * sds, rel=1e-5)
    assert das > 0 and sds > 0


@pytest.mark.parametrize("drop,standardize,kl", [("3", False, "forward"), ("0", True, "reverse"),
                                                  ("5", True, "forward")])
def test_target_variants_match_float64_reference(tiny_paths, drop, standardize, kl):
    """--basic_drop_channels N / --basic_standardize_target inside LLaVA's real forward, against the
    formulas written out in float64 (the channels: the top N of the probe statistic, recomputed here)."""
    from basic_plugin.basic.channels import channel_statistic, choose_channels, probe_ids, probe_states

    model = make_model(tiny_paths, attn="sdpa")
    tokenizer = tiny_tokenizer(tiny_paths)
    ready(model, tokenizer=tokenizer, basic_drop_channels=drop, basic_standardize_target=standardize, basic_kl=kl,
          basic_lambda_sds=0.5, basic_sds_chunk_size=5)
    settings = binding_of(model).objectives[0].settings
    # the channels: the N largest mean |h| (over the probe's tokens and layers 1..k) relative to the median
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        hs = LlamaForCausalLM.forward(model, input_ids=ids, output_hidden_states=True).hidden_states
    mags = torch.stack([hs[l][0].double().abs().mean(0) for l in range(1, DEPTH + 1)]).mean(0)
    expected = torch.argsort(mags, descending=True).tolist()[:int(drop)]
    assert list(settings.drop_channels) == expected and settings.standardize_target is standardize
    assert choose_channels(channel_statistic(probe_states(model, ids, DEPTH)), drop) == expected
    eager = make_model(tiny_paths, attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = make_batch(BATCH)
    out = model(**batch)
    terms = last_step(model).terms
    das, sds, lm = reference_terms(eager, batch, depth=DEPTH, weights_mode="raw", kl=kl,
                                   drop=expected, standardize=standardize)
    plain_das, plain_sds, _ = reference_terms(eager, batch, depth=DEPTH, weights_mode="raw", kl=kl)
    assert terms["basic_das"].item() == pytest.approx(das, rel=1e-4, abs=1e-7)
    assert terms["basic_sds"].item() == pytest.approx(0.5 * sds, rel=1e-4, abs=1e-7)
    assert out.loss.item() == pytest.approx(lm + das + 0.5 * sds, rel=1e-5)
    # the variant changes the terms (the tiny model's L_sds is small: relative)
    assert abs(das - plain_das) > 1e-3 * plain_das and abs(sds - plain_sds) > 1e-3 * plain_sds


def test_dropped_channels_get_no_basic_gradient(tiny_paths):
    """Through the real forward: BASIC's gradient at the projector output (the run's gradient minus the
    monitor run's, same weights and batch) is exactly zero in the dropped channels, and not elsewhere."""
    import dataclasses

    model = ready(make_model(tiny_paths), pretraining=True, tokenizer=tiny_tokenizer(tiny_paths),
                  basic_drop_channels="4", basic_lambda_sds=0.3)
    objective = binding_of(model).objectives[0]
    channels = list(objective.settings.drop_channels)
    assert len(channels) == 4
    batch = make_batch(BATCH)
    grads = {}
    for name, lambdas in (("basic", {}), ("monitor", {"lambda_das": 0.0, "lambda_sds": 0.0})):
        objective.settings = dataclasses.replace(objective.settings, **lambdas)
        captured = []

        def keep(module, args, output):
            output.retain_grad()
            captured.append(output)

        hook = model.get_model().mm_projector.register_forward_hook(keep)
        try:
            model(**batch).loss.backward()
        finally:
            hook.remove()
        grads[name] = captured[0].grad.clone()
    basic = grads["basic"] - grads["monitor"]
    assert torch.count_nonzero(basic[..., channels]) == 0
    kept = [c for c in range(basic.shape[-1]) if c not in channels]
    assert basic[..., kept].abs().max() > 1e-6


def test_image_rows_of_the_llm_input_are_the_projector_output(tiny_paths):
    from basic_plugin.host.positions import image_token_positions

    model = make_model(tiny_paths)
    batch = make_batch(BATCH)
    with torch.no_grad():
        feats = model.encode_images(batch["images"])
        _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"])
    pos = image_token_positions(batch["input_ids"], batch["attention_mask"], feats.shape[1],
                                max_length=64, padding_side="right")
    assert pos.num_rows == 4 * feats.shape[1]
    assert torch.equal(embeds[pos.batch_index, pos.seq_index], feats[pos.image_index, pos.patch_index])


def grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pretraining_sends_basic_gradient_to_the_projector_only(tiny_paths):
    model = make_model(tiny_paths)
    model.requires_grad_(False)
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad_(True)
    batch = make_batch(BATCH)
    with_basic = grads(ready(model, pretraining=True), batch)
    assert with_basic and all("mm_projector" in n for n in with_basic)
    without = grads(ready(model, pretraining=True, basic_lambda_das=0.0, basic_lambda_sds=0.0), batch)
    assert any(not torch.allclose(with_basic[n], without[n]) for n in with_basic)
    # --basic_pretrain False turns it off for this stage: loss is the LM loss alone
    on = ready(model, pretraining=True)
    with torch.no_grad():
        on_loss = on(**batch).loss.item()
    lm = last_step(on).terms["lm_loss"].item()
    off = ready(model, pretraining=True, basic_pretrain=False)
    assert binding_of(off) is None  # nothing bound: LLaVA's own forward
    out = off(**batch)
    assert out.loss.item() == pytest.approx(lm) and on_loss > lm


@pytest.mark.parametrize("vocab", ["embed", "lm_head"])
def test_vocab_gradient_only_when_trainable_and_not_detached(tiny_paths, vocab):
    model = make_model(tiny_paths)
    name = "model.embed_tokens.weight" if vocab == "embed" else "lm_head.weight"
    batch = make_batch(BATCH)
    base = grads(ready(model, basic_vocab=vocab, basic_lambda_sds=0.0), batch)[name]
    live = grads(ready(model, basic_vocab=vocab, basic_lambda_sds=1.0), batch)[name]
    detached = grads(ready(model, basic_vocab=vocab, basic_lambda_sds=1.0, basic_detach_vocab=True), batch)[name]
    assert not torch.allclose(base, live)
    assert torch.allclose(base, detached, atol=1e-7)


def test_text_only_batch_gives_zero_terms_and_the_same_module_calls(tiny_paths):
    model = ready(make_model(tiny_paths))
    calls = {}
    layer = model.get_model().layers[0]
    watched = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "embed": model.get_input_embeddings(),
               "proj": model.get_model().mm_projector}
    for key, module in watched.items():
        module.register_forward_pre_hook(lambda m, a, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
    model(**make_batch(BATCH)).loss.backward()
    with_images = dict(calls)
    calls.clear()
    text_only = make_batch([[1, 5, 6, 2], [1, 7, 2], [1, 8, 8, 2], [1, 9, 2]])  # same batch size: LLaVA embeds per sample
    out = model(**text_only)
    assert last_step(model).terms["basic_das"].item() == 0.0 and last_step(model).terms["basic_sds"].item() == 0.0
    assert out.loss.item() == pytest.approx(last_step(model).terms["lm_loss"].item())
    out.loss.backward()
    assert calls == with_images
    projector_grads = [p.grad for p in model.get_model().mm_projector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in projector_grads)


def test_eval_mode_is_llava_unchanged(tiny_paths):
    model = ready(make_model(tiny_paths))
    batch = make_batch(BATCH)
    model.eval()
    with torch.no_grad():
        plugin = model(**batch).loss
        vanilla = LlavaLlamaForCausalLM.forward(model, **batch).loss
    assert torch.equal(plugin, vanilla)


def test_unsupported_model_is_refused(tiny_paths):
    args = types.SimpleNamespace(**{**asdict(BasicArguments()), "basic": True, "tune_mm_mlp_adapter": False})
    plain_llama = LlamaForCausalLM.from_pretrained(tiny_paths["lm"])
    with pytest.raises(ValueError, match="supports llava_llama, llava_mistral"):
        basic.settings_for(plain_llama, args)


def test_depth_out_of_range_is_refused(tiny_paths):
    model = make_model(tiny_paths)
    with pytest.raises(ValueError, match="basic_depth 9"):
        ready(model, basic_depth=9)


@pytest.fixture(scope="module")
def tiny_mistral_paths(tiny_paths, tmp_path_factory):
    """The tiny LLaVA's vision tower with a tiny random Mistral LLM (same sizes as the Llama)."""
    llama = LlamaForCausalLM.from_pretrained(tiny_paths["lm"]).config
    config = MistralConfig(vocab_size=llama.vocab_size, hidden_size=llama.hidden_size,
                           intermediate_size=llama.intermediate_size, num_hidden_layers=llama.num_hidden_layers,
                           num_attention_heads=llama.num_attention_heads,
                           num_key_value_heads=llama.num_key_value_heads, sliding_window=4096)
    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(folder)
    return dict(tiny_paths, lm=folder)


def test_mistral_checkpoints_train_as_llava_mistral_with_basic(tiny_mistral_paths):
    model = ready(make_model(tiny_mistral_paths, attn="sdpa"), basic_lambda_sds=0.5)
    assert isinstance(model, LlavaMistralForCausalLM) and type(model).__name__ == "LlavaMistralForCausalLM"
    eager = make_model(tiny_mistral_paths, attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = make_batch(BATCH)
    model(**batch)
    das, sds, lm = reference_terms(eager, batch, depth=DEPTH, weights_mode="raw", kl="forward")
    assert last_step(model).terms["basic_das"].item() == pytest.approx(das, rel=1e-4)
    # this random Mistral's KL is ~5e-6: fp32 log-softmax over the vocabulary resolves it to ~1e-8
    assert last_step(model).terms["basic_sds"].item() == pytest.approx(0.5 * sds, rel=1e-4, abs=5e-8)
    assert sds > 1e-6 and last_step(model).terms["lm_loss"].item() == pytest.approx(lm, rel=1e-5)


def test_settings_are_the_flags_with_depth_and_channels_resolved(tiny_paths):
    """BasicSettings holds each --basic_<name> as given; its defaults are the paper's (INTEGRATION.md's flag table)."""
    from basic_plugin.basic.objective import BasicSettings

    model = make_model(tiny_paths)
    given = {"basic_lambda_das": 0.25, "basic_temperature": 2.0, "basic_kl": "reverse", "basic_query_chunk": 7,
             "basic_standardize_target": True}
    args = types.SimpleNamespace(**{**asdict(BasicArguments()), "basic": True, "tune_mm_mlp_adapter": True, **given})
    settings = basic.settings_for(model, args)
    assert asdict(settings) == {"depth": 2, "lambda_das": 0.25, "lambda_sds": 0.01, "temperature": 2.0,
                                "vocab": "embed", "detach_vocab": False, "patch_weights": "raw", "kl": "reverse",
                                "sds_chunk_size": 256, "query_chunk": 7, "drop_channels": (),
                                "standardize_target": True}
    flags = {f"basic_{name}" for name in asdict(settings)} - {"basic_drop_channels"}
    assert flags <= set(asdict(BasicArguments()))  # every setting but the resolved channel list is a flag
    assert BasicSettings.from_flags(args, depth=3, drop_channels=[5, 1]).drop_channels == (5, 1)


def test_the_loss_functions_and_the_guard_default_to_the_flags_defaults():
    import inspect

    from basic_plugin.basic.guard import Guard
    from basic_plugin.basic.losses import basic_terms_fused
    from basic_plugin.basic.patch_weights import image_attention_mass

    flags = BasicArguments()
    fused = inspect.signature(basic_terms_fused).parameters
    assert (fused["lambda_das"].default, fused["lambda_sds"].default, fused["temperature"].default,
            fused["reverse"].default, fused["chunk_size"].default) == (1.0, 0.01, 1.0, False, 256)
    assert (flags.basic_lambda_das, flags.basic_lambda_sds, flags.basic_temperature, flags.basic_kl,
            flags.basic_sds_chunk_size) == (1.0, 0.01, 1.0, "forward", 256)
    assert inspect.signature(image_attention_mass).parameters["query_chunk"].default == flags.basic_query_chunk
    guard = Guard()
    assert (guard.mode, guard.window, guard.collapse, guard.share) == ("warn", 5, 0.9, 0.75)
    assert vars(Guard.from_flags(flags)) == vars(guard)
