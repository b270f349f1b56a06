#!/usr/bin/env bash
# Idempotent set-up: .venv in the repo with the exact CPU working set (constraints.txt)
# and basic-llava itself installed (editable, so its entry points register BASIC).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=.venv
stamp=$venv/.basic-llava-setup
want=$(cat constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import basic_plugin, llava" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $venv with LLaVA's CPU training stack (about 2 minutes the first time)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check"
# torch first and pinned: anything unpinned would pull a multi-GB CUDA build.
$pip install -q "torch==$(grep '^torch==' constraints.txt | cut -d= -f3)"
# llava-torch's own pins (torch 2.0.1, transformers 4.36.2, ...) are wrong for training: no deps.
$pip install -q --no-deps "llava-torch==$(grep '^llava-torch==' constraints.txt | cut -d= -f3)"
$pip install -q -c constraints.txt transformers tokenizers accelerate deepspeed peft pluggy \
  sentencepiece protobuf safetensors huggingface_hub numpy pillow einops matplotlib tqdm shortuuid pytest \
  gguf onnx ml_dtypes onnxruntime flatbuffers build pyproject_hooks packaging
$pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "[setup] done: $($venv/bin/python -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)')"
