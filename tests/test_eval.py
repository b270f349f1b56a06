"""Evaluating a BASIC checkpoint with LLaVA's own code, as INTEGRATION.md ("Evaluate a BASIC checkpoint") says.

On the tiny random LLaVA, as far as a CPU goes: a BASIC LoRA run is merged as LLaVA's
``scripts/merge_lora_weights.py`` merges it (the script itself with ``LLAVA_DIR`` set), the merged
folder loads with ``load_pretrained_model`` in a process where basic-llava cannot be imported,
generates, and answers a few questions through ``python -m llava.eval.model_vqa_loader`` (the
python entry of LLaVA's ``gqa.sh``, ``textvqa.sh`` and ``vizwiz.sh``). The documented ``sed``
that points LLaVA's ``scripts/v1_5/eval/*.sh`` at a checkpoint is run as written, and gives the
recipe's copies byte for byte.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from basic_plugin.lab.tiny import tiny_train_args
from tests.helpers import REPO_ROOT, run_training, training_env

INTEGRATION = (REPO_ROOT / "INTEGRATION.md").read_text()
#: the body of LLaVA's scripts/merge_lora_weights.py (c121f04), used when no LLaVA checkout is at hand
MERGE_LORA = """
import sys
from llava.model.builder import load_pretrained_model
from llava.mm_utils import get_model_name_from_path
model_path, model_base, save_model_path = sys.argv[1:]
tokenizer, model, image_processor, context_len = load_pretrained_model(
    model_path, model_base, get_model_name_from_path(model_path), device_map='cpu')
model.save_pretrained(save_model_path)
tokenizer.save_pretrained(save_model_path)
"""
WITHOUT_BASIC_LLAVA = "import sys; sys.modules['basic_plugin'] = None\n"


def _run(argv, cwd, timeout=600):
    res = subprocess.run([str(a) for a in argv], cwd=cwd, env=training_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _merge(lora: Path, base: Path, merged: Path, cwd: Path):
    llava_dir = os.environ.get("LLAVA_DIR")
    if llava_dir and (Path(llava_dir) / "scripts" / "merge_lora_weights.py").is_file():
        script = Path(llava_dir) / "scripts" / "merge_lora_weights.py"
        code = (WITHOUT_BASIC_LLAVA + "import runpy; sys.argv = [sys.argv[0], '--model-path', %r, '--model-base', %r, "
                "'--save-model-path', %r]; runpy.run_path(%r, run_name='__main__')"
                % (str(lora), str(base), str(merged), str(script)))
        return _run([sys.executable, "-c", code], cwd)
    return _run([sys.executable, "-c", WITHOUT_BASIC_LLAVA + MERGE_LORA, lora, base, merged], cwd)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    return {k: v for f in sorted(folder.glob("pytorch_model*.bin")) for k, v in torch.load(f, weights_only=True).items()}


def test_a_basic_lora_checkpoint_merges_loads_and_answers_with_llavas_eval_entry(tiny_llava, tiny_data_v1,
                                                                                 tmp_path):
    lora = tmp_path / "llava-tiny-basic-lora"  # LLaVA's loader keys on 'llava' and 'lora' in the name
    run_training("basic_plugin.train", tiny_train_args(tiny_llava, *tiny_data_v1, lora, stage="finetune", lora=True,
                                                       max_steps=2, extra=["--basic", "True"]), output_dir=lora)
    assert {"adapter_model.safetensors", "non_lora_trainables.bin", "config.json"} <= {p.name for p in lora.iterdir()}
    merged = tmp_path / "llava-tiny-basic-lora-merged"
    _merge(lora, tiny_llava["lm"], merged, tmp_path)

    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert not [k for k in config if re.search("basic|plugin", k)]
    # the projector the LoRA run trained is the merged model's (from non_lora_trainables.bin)
    trained = {k.split("model.mm_projector.", 1)[1]: v for k, v in
               torch.load(lora / "non_lora_trainables.bin", weights_only=True).items() if "mm_projector" in k}
    weights = _weights(merged)
    assert trained and all(torch.allclose(weights[f"model.mm_projector.{k}"].float(), v.half().float())
                           for k, v in trained.items())

    # load and generate with LLaVA's loader, basic-llava kept out of the process
    probe = WITHOUT_BASIC_LLAVA + f"""
import torch
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import load_pretrained_model
tokenizer, model, processor, _ = load_pretrained_model({str(merged)!r}, None, {merged.name!r}, device="cpu",
                                                       device_map=None)
image = processor.preprocess(torch.zeros(3, 56, 56).numpy().transpose(1, 2, 0), return_tensors="pt")["pixel_values"]
ids = tokenizer_image_token("USER: <image>\\nWhat is it? ASSISTANT:", tokenizer, return_tensors="pt")[None]
with torch.no_grad():
    out = model.generate(ids, images=image.to(model.dtype), max_new_tokens=4, do_sample=False)
print("generated", type(model).__module__, out.shape[1])  # with images, generate returns the new tokens only
"""
    line = _run([sys.executable, "-c", probe], tmp_path).stdout.strip().splitlines()[-1].split()
    # up to 4 new tokens, after the start token generate puts first when it starts from embeddings
    assert line[:2] == ["generated", "llava.model.language_model.llava_llama"] and 2 <= int(line[2]) <= 1 + 4

    # LLaVA's eval entry on three questions, as gqa.sh runs it (greedy, vicuna_v1)
    data, images = tiny_data_v1
    records = [r for r in json.loads(Path(data).read_text()) if "image" in r][:3]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "image": r["image"], "text": "What is it?"})
                                 + "\n" for i, r in enumerate(records)))
    answers = tmp_path / "answers" / f"{merged.name}.jsonl"
    _run([sys.executable, "-m", "tests._cpu_eval", "llava.eval.model_vqa_loader", "--model-path", merged,
          "--question-file", questions, "--image-folder", images, "--answers-file", answers, "--temperature", "0",
          "--conv-mode", "vicuna_v1", "--max_new_tokens", "4"], REPO_ROOT)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(r["model_id"] == merged.name and isinstance(r["text"], str) for r in rows)


def _documented_sed() -> str:
    """The sed command of INTEGRATION.md's eval loop, as written (its input is the loop's script)."""
    section = INTEGRATION.split("## Evaluate a BASIC checkpoint", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"(sed -e .*?)\\\n\s+scripts/v1_5/eval/\$BENCH\.sh > \S+", section, re.S)
    assert match, "INTEGRATION.md's eval loop has no sed command"
    return match.group(1).strip()


def _recipe():
    import importlib.util

    name = "llava15_basic_for_eval_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / "recipes" / "llava15_basic.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _eval_scripts():
    """LLaVA's scripts/v1_5/eval/*.sh from LLAVA_DIR, or (without a checkout) the lines of theirs that name the model."""
    llava_dir = os.environ.get("LLAVA_DIR")
    folder = Path(llava_dir or "/nonexistent") / "scripts" / "v1_5" / "eval"
    if folder.is_dir():
        return {p.name: p.read_text() for p in sorted(folder.glob("*.sh"))}
    from tests.test_recipes import LLAVA_LIKE_EVAL_SCRIPT

    return {"like-gqa.sh": LLAVA_LIKE_EVAL_SCRIPT}


@pytest.mark.parametrize("name", ["llava-v1.5-7b-basic", "llava-v1.5-13b-basic", "llava-v1.5-7b-basic-lora-merged"])
def test_the_documented_sed_points_llavas_eval_scripts_at_the_checkpoint(tmp_path, name):
    ckpt = tmp_path / "checkpoints" / name
    sed = _documented_sed()
    for script, text in _eval_scripts().items():
        src = tmp_path / script
        src.write_text(text)
        res = subprocess.run(["bash", "-c", f'CKPT={ckpt}; NAME=$(basename "$CKPT"); {sed} "$1"', "-", src],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout == _recipe().rewrite_eval_script(text, ckpt), script  # the recipe's copy, byte for byte
        left = res.stdout.replace(str(ckpt), "@CKPT").replace(name, "@NAME")
        assert "liuhaotian/" not in left and "llava-v1.5-13b" not in left, script
        for path in re.findall(r"--model-path (\S+)", res.stdout):
            assert path == str(ckpt), (script, path)
