"""Tests for basic_plugin.basic.patch_weights.image_attention_mass (BASIC a_i, decision D3).

The reference a_i is computed here from the attention probabilities that an eager model
returns (``output_attentions=True``), in float64 with plain loops, straight from the
definition: mean over layers 1..k, heads and text queries j after the image block (valid,
not image tokens) of attn[j -> i]; 0 when the row has no query.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from basic_plugin.basic.patch_weights import image_attention_mass

L = 24
VOCAB = 50
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HIDDEN = 32
TOL = dict(rtol=1e-5, atol=1e-6)


def _build(kind, attn="eager", seed=0):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=4096, **common))
    # larger random projections than the default init, so attention is far from uniform
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 0.5)
            layer.self_attn.k_proj.weight.normal_(0, 0.5)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request):
    return _build(request.param)


def _run(model, input_ids, attention_mask, position_ids=None):
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_attentions=True,
            output_hidden_states=True,
            return_dict=True,
        )
    return out


def _reference(attentions, attention_mask, rows, depth):
    """rows: list of (b, s, e). Float64, plain loops over the returned probabilities."""
    bsz, seq_len = attention_mask.shape
    image = set((b, s) for b, s, _ in rows)
    ref = []
    for b, s, e in rows:
        queries = [
            j
            for j in range(e + 1, seq_len)
            if attention_mask[b, j].item() != 0 and (b, j) not in image
        ]
        if not queries:
            ref.append(0.0)
            continue
        total = 0.0
        count = 0
        for l in range(depth):
            att = attentions[l].double()
            for h in range(att.shape[1]):
                for j in queries:
                    total += att[b, h, j, s].item()
                    count += 1
        ref.append(total / count)
    return torch.tensor(ref, dtype=torch.float64)


def _rows(blocks):
    """blocks: list of (b, start, length) -> list of (b, s, e)."""
    rows = []
    for b, start, length in blocks:
        end = start + length - 1
        rows.extend((b, s, end) for s in range(start, start + length))
    return rows


def _tensors(rows):
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone(), empty.clone()
    t = torch.tensor(rows, dtype=torch.long)
    return t[:, 0], t[:, 1], t[:, 2]


def _ids(bsz, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (bsz, L), generator=g)


def _check(model, mask, blocks, depths=(1, 2, LAYERS), chunks=(1, 3, 1000), position_ids=None):
    ids = _ids(mask.shape[0])
    out = _run(model, ids, mask, position_ids)
    rows = _rows(blocks)
    bi, si, ei = _tensors(rows)
    for depth in depths:
        ref = _reference(out.attentions, mask, rows, depth)
        for chunk in chunks:
            got = image_attention_mass(
                model.model.layers,
                out.hidden_states,
                mask,
                bi,
                si,
                ei,
                depth=depth,
                position_ids=position_ids,
                query_chunk=chunk,
            )
            assert got.dtype == torch.float32 and got.shape == (len(rows),)
            assert not got.requires_grad
            torch.testing.assert_close(got.double(), ref, **TOL)
    return out, rows


def test_right_padding(model):
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, 18:] = 0
    mask[1, 21:] = 0
    _check(model, mask, [(0, 2, 6), (1, 1, 7)])


def test_left_padding(model):
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :2] = 0
    _check(model, mask, [(0, 6, 6), (1, 3, 8)])


def test_left_padding_with_position_ids(model):
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    _check(model, mask, [(0, 6, 6), (1, 3, 8)], depths=(LAYERS,), chunks=(4,), position_ids=pos)


def test_two_blocks_one_sample_and_textonly_and_block_at_end(model):
    mask = torch.ones(3, L, dtype=torch.long)
    mask[2, 20:] = 0
    blocks = [
        (0, 2, 5),  # first block of sample 0: its queries exclude the second block
        (0, 10, 4),  # second block of sample 0
        # sample 1 has no image: no rows
        (2, 15, 5),  # block ends at 19, the last valid token: no queries -> 0
    ]
    out, rows = _check(model, mask, blocks)
    got = image_attention_mass(
        model.model.layers, out.hidden_states, mask, *_tensors(rows), depth=2
    )
    assert torch.all(got[-5:] == 0)
    assert torch.all(got[:-5] > 0)


def test_block_at_very_end_no_queries(model):
    mask = torch.ones(1, L, dtype=torch.long)
    out = _run(model, _ids(1), mask)
    bi, si, ei = _tensors(_rows([(0, L - 4, 4)]))
    got = image_attention_mass(model.model.layers, out.hidden_states, mask, bi, si, ei, depth=LAYERS)
    assert torch.equal(got, torch.zeros(4))


def test_mask_none_and_bool(model):
    ids = _ids(2)
    ones = torch.ones(2, L, dtype=torch.long)
    out = _run(model, ids, ones)
    rows = _rows([(0, 3, 5), (1, 0, 4)])
    ref = _reference(out.attentions, ones, rows, 3)
    for mask in (None, ones.bool()):
        got = image_attention_mass(model.model.layers, out.hidden_states, mask, *_tensors(rows), depth=3)
        torch.testing.assert_close(got.double(), ref, **TOL)


def test_sdpa_hidden_states_give_same_values(model):
    sdpa = _build("llama" if isinstance(model, LlamaForCausalLM) else "mistral", attn="sdpa")
    sdpa.load_state_dict(model.state_dict())
    assert type(sdpa.model.layers[0].self_attn).__name__.endswith("SdpaAttention")
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, 19:] = 0
    mask[1, :3] = 0
    ids = _ids(2)
    eager_out = _run(model, ids, mask)
    with torch.no_grad():
        sdpa_out = sdpa(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
    assert sdpa_out.attentions is None
    rows = _rows([(0, 1, 6), (1, 4, 5), (1, 12, 3)])
    bi, si, ei = _tensors(rows)
    for depth in (1, LAYERS):
        ref = _reference(eager_out.attentions, mask, rows, depth)
        got = image_attention_mass(sdpa.model.layers, sdpa_out.hidden_states, mask, bi, si, ei, depth=depth)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def _count_calls(layers, depth):
    counts = {}
    handles = []
    for l, layer in enumerate(layers):
        for name, mod in (
            ("input_layernorm", layer.input_layernorm),
            ("q_proj", layer.self_attn.q_proj),
            ("k_proj", layer.self_attn.k_proj),
        ):
            counts[(l, name)] = 0

            def hook(module, args, key=(l, name)):
                counts[key] += 1

            handles.append(mod.register_forward_pre_hook(hook))
    return counts, handles


@pytest.mark.parametrize(
    "blocks",
    [
        [],  # M == 0
        [(0, L - 3, 3)],  # rows but no queries
        [(0, 2, 5), (0, 9, 3), (1, 4, 4)],  # several samples, several chunks
    ],
)
def test_module_calls_once_per_layer(model, blocks):
    mask = torch.ones(2, L, dtype=torch.long)
    out = _run(model, _ids(2), mask)
    depth = 3
    counts, handles = _count_calls(model.model.layers, depth)
    try:
        image_attention_mass(
            model.model.layers, out.hidden_states, mask, *_tensors(_rows(blocks)), depth=depth, query_chunk=2
        )
    finally:
        for h in handles:
            h.remove()
    for (l, name), n in counts.items():
        assert n == (1 if l < depth else 0), (l, name, n)


def test_gradient_free_and_training_flags_restored(model):
    mask = torch.ones(1, L, dtype=torch.long)
    ids = _ids(1)
    model.train()
    try:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        assert out.hidden_states[1].requires_grad
        got = image_attention_mass(model.model.layers, out.hidden_states, mask, *_tensors(_rows([(0, 2, 4)])), depth=2)
        assert not got.requires_grad
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


def test_peft_lora_projections():
    peft = pytest.importorskip("peft")
    base = _build("llama")
    lora = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_dropout=0.5),
    )
    with torch.no_grad():  # non-zero B so LoRA changes the attention
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.eval()
    layers = lora.base_model.model.model.layers
    assert type(layers[0].self_attn.q_proj).__module__.startswith("peft")
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 20:] = 0
    ids = _ids(2)
    with torch.no_grad():
        out = lora(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        base_out = _run(base, ids, mask)
    rows = _rows([(0, 2, 6), (1, 5, 4)])
    ref = _reference(out.attentions, mask, rows, LAYERS)
    base_ref = _reference(base_out.attentions, mask, rows, LAYERS)
    assert (ref - base_ref).abs().max() > 1e-3  # LoRA actually matters here
    lora.train()  # dropout must not make a_i random
    got = image_attention_mass(layers, out.hidden_states, mask, *_tensors(rows), depth=LAYERS)
    lora.eval()
    torch.testing.assert_close(got.double(), ref, **TOL)


def test_bfloat16_runs_close():
    model = _build("llama").to(torch.bfloat16)
    mask = torch.ones(1, L, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=_ids(1), attention_mask=mask, output_attentions=True, output_hidden_states=True)
    rows = _rows([(0, 3, 6)])
    got = image_attention_mass(model.model.layers, out.hidden_states, mask, *_tensors(rows), depth=2)
    assert got.dtype == torch.float32
    ref = _reference(out.attentions, mask, rows, 2)
    torch.testing.assert_close(got.double(), ref, rtol=0.05, atol=0.01)


def test_errors(model):
    mask = torch.ones(1, L, dtype=torch.long)
    out = _run(model, _ids(1), mask)
    bi, si, ei = _tensors(_rows([(0, 2, 4)]))
    with pytest.raises(ValueError):
        image_attention_mass(model.model.layers, out.hidden_states, mask, bi, si, ei, depth=0)
    with pytest.raises(ValueError):
        image_attention_mass(model.model.layers, out.hidden_states, mask, bi, si, ei, depth=LAYERS + 1)
    with pytest.raises(ValueError):
        image_attention_mass(model.model.layers, out.hidden_states[:2], mask, bi, si, ei, depth=2)
    with pytest.raises(TypeError, match="input_layernorm"):
        image_attention_mass(
            torch.nn.ModuleList([torch.nn.Linear(4, 4)]), out.hidden_states, mask, bi, si, ei, depth=1
        )
    broken = copy.deepcopy(model.model.layers[:1])
    del broken[0].self_attn.rotary_emb
    with pytest.raises(TypeError, match="rotary_emb"):
        image_attention_mass(broken, out.hidden_states, mask, bi, si, ei, depth=1)
