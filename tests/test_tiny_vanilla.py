"""The tiny fixture runs LLaVA's real, unmodified ``train()`` end to end on CPU.

Three runs of ``tests._vanilla_train`` (LLaVA's ``train()`` + the CPU workarounds):
pretraining (plain template, projector only, no DeepSpeed), a full v1 finetune with gradient
checkpointing under ZeRO-3 on 2 ranks, and a LoRA v1 finetune under ZeRO-2 on 1 rank.
"""
from __future__ import annotations

import json

import pytest
import torch

from basic_plugin.lab.tiny import NUM_PATCHES, VISION_HIDDEN, tiny_train_args
from tests.helpers import all_finite, run_training

VANILLA = "tests._vanilla_train"
MAX_STEPS = 4
PROJECTOR_KEYS = {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                  "model.mm_projector.2.weight", "model.mm_projector.2.bias"}


def _lm_hidden(tiny_llava) -> int:
    return json.loads((tiny_llava["lm"] / "config.json").read_text())["hidden_size"]


@pytest.fixture(scope="module")
def pretrained(tiny_llava, tiny_data_plain, tmp_path_factory):
    """Stage 1: LLaVA pretraining of the projector, no DeepSpeed."""
    out = tmp_path_factory.mktemp("vanilla") / "pretrain"
    args = tiny_train_args(tiny_llava, *tiny_data_plain, out, stage="pretrain",
                           max_steps=MAX_STEPS)
    return run_training(VANILLA, args, output_dir=out)


def test_pretrain_plain_writes_projector(pretrained, tiny_llava):
    out = pretrained["output_dir"]
    assert pretrained["steps"] == list(range(1, MAX_STEPS + 1))
    assert all_finite(pretrained["losses"])

    weights = torch.load(out / "mm_projector.bin", map_location="cpu")
    assert set(weights) == PROJECTOR_KEYS
    hidden = _lm_hidden(tiny_llava)
    assert weights["model.mm_projector.0.weight"].shape == (hidden, VISION_HIDDEN)
    assert weights["model.mm_projector.2.weight"].shape == (hidden, hidden)
    assert all(torch.isfinite(w).all() for w in weights.values())
    # Projector-only checkpoint: no full model weights.
    assert not list(out.glob("model*.safetensors")) and not list(out.glob("pytorch_model*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["mm_projector_type"] == "mlp2x_gelu"
    assert config["tune_mm_mlp_adapter"] is True


def test_finetune_v1_zero3_two_ranks(pretrained, tiny_llava, tiny_data_v1, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "finetune_zero3"
    projector = pretrained["output_dir"] / "mm_projector.bin"
    args = tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune",
                           max_steps=MAX_STEPS, deepspeed_config="zero3",
                           gradient_checkpointing=True, pretrain_mm_mlp_adapter=projector)
    result = run_training(VANILLA, args, output_dir=out, deepspeed_ranks=2)
    assert result["steps"] == list(range(1, MAX_STEPS + 1))
    assert all_finite(result["losses"])
    # No "tokenization mismatch": the v1 labels were not all masked away.
    assert "tokenization mismatch" not in result["output"]

    state = load_file(str(out / "model.safetensors"))
    hidden = _lm_hidden(tiny_llava)
    vocab = json.loads((tiny_llava["lm"] / "config.json").read_text())["vocab_size"]
    # ZeRO-3 shards were gathered for the save: full shapes, not empty partitions.
    assert state["lm_head.weight"].shape == (vocab, hidden)
    assert state["model.embed_tokens.weight"].shape == (vocab, hidden)
    assert any(k.startswith("model.vision_tower.") for k in state)
    # The projector started from the pretrained one (lr 2e-5 for 4 steps barely moves it).
    pre = torch.load(projector, map_location="cpu")
    for key in PROJECTOR_KEYS:
        assert torch.allclose(state[key].float(), pre[key].float(), atol=1e-3), key
    config = json.loads((out / "config.json").read_text())
    assert config["image_aspect_ratio"] == "pad"
    assert config["mm_vision_tower"] == str(tiny_llava["vision"])


def test_lora_finetune_zero2_one_rank(tiny_llava, tiny_data_v1, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora_zero2"
    args = tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune",
                           max_steps=MAX_STEPS, deepspeed_config="zero2", lora=True)
    result = run_training(VANILLA, args, output_dir=out, deepspeed_ranks=1)
    assert result["steps"] == list(range(1, MAX_STEPS + 1))
    assert all_finite(result["losses"])

    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and any("lora_B" in k for k in adapter)
    assert not any("mm_projector" in k or "vision_tower" in k for k in adapter)
    non_lora = torch.load(out / "non_lora_trainables.bin", map_location="cpu")
    assert {k.split("mm_projector.")[1] for k in non_lora if "mm_projector." in k} == \
        {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert NUM_PATCHES == 16  # geometry the fixture promises (56 px / 14 px patches)


def test_tiny_tokenizer_fits_llava_templates(tiny_llava, tiny_data_plain, tiny_data_v1,
                                             monkeypatch):
    """In-process: LLaVA's own preprocessing keeps answer labels for every tiny record."""
    import copy
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    import llava.conversation as conversation_lib
    from llava.train import train as llava_train

    tok = AutoTokenizer.from_pretrained(tiny_llava["lm"], use_fast=False, padding_side="right",
                                        model_max_length=512)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert type(tok).__name__ == "LlamaTokenizer" and tok.legacy is False
    for piece in ("USER", "ASSISTANT"):
        assert piece in tok.tokenize(f"x{piece}: y")  # a single piece, even glued to text
    tok.pad_token = tok.unk_token  # what train() does for v1 / plain
    data_args = SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)

    for template, (json_path, _) in (("plain", tiny_data_plain), ("v1", tiny_data_v1)):
        monkeypatch.setattr(conversation_lib, "default_conversation",
                            conversation_lib.conv_templates[template])
        for record in json.loads(json_path.read_text()):
            sources = copy.deepcopy([record["conversations"]])
            if "image" in record:
                sources = llava_train.preprocess_multimodal(sources, data_args)
            out = llava_train.preprocess(sources, tok, has_image="image" in record)
            labels = out["labels"][0]
            n_answers = sum(m["from"] == "gpt" for m in record["conversations"])
            # Each answer ends with </s> (v1) or "\n" (plain), and is supervised.
            assert (labels != -100).sum() > n_answers, (template, record["id"])
            assert (out["input_ids"][0] == -200).sum() == (1 if "image" in record else 0)
