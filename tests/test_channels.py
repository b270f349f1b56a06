"""The channel analysis of the mechanism, against numpy, and on a trained tiny projector."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from basic_plugin.lab.channels import channel_shares


def test_channel_shares_against_numpy():
    rng = np.random.default_rng(0)
    vhat = rng.normal(size=(7, 11))
    vhat[:, 3] *= 40  # two massive channels
    vhat[:, 8] *= 25
    v = rng.normal(size=(7, 11))
    v[:, 3] += 5
    got = channel_shares(torch.tensor(v, dtype=torch.float32), torch.tensor(vhat, dtype=torch.float32), top=2)
    assert sorted(got["top_channels"]) == [3, 8]
    top, rest = [3, 8], [i for i in range(11) if i not in (3, 8)]
    share = lambda x: np.mean((x[:, top] ** 2).sum(1) / (x ** 2).sum(1))  # noqa: E731
    cos = lambda a, b: np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))  # noqa: E731
    assert got["vhat_share"] == pytest.approx(share(vhat), rel=1e-5) and got["vhat_share"] > 0.9
    assert got["v_share"] == pytest.approx(share(v), rel=1e-5)
    assert got["cos"] == pytest.approx(cos(v, vhat), rel=1e-5)
    assert got["cos_without_top"] == pytest.approx(cos(v[:, rest], vhat[:, rest]), rel=1e-5)
    assert got["v_norm"] == pytest.approx(np.linalg.norm(v, axis=1).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="matching"):
        channel_shares(torch.zeros(3, 4), torch.zeros(3, 5))


def projector_checkpoint(tiny_llava, out: Path) -> Path:
    """A stage-1 style projector-only folder (config.json with the mm_* fields, mm_projector.bin) for the tiny LLaVA."""
    lm = json.loads((Path(tiny_llava["lm"]) / "config.json").read_text())
    vis = json.loads((Path(tiny_llava["vision"]) / "config.json").read_text())
    d, dv = lm["hidden_size"], vis["hidden_size"]
    out.mkdir(parents=True)
    config = {**lm, "model_type": "llava_llama", "mm_vision_tower": str(tiny_llava["vision"]), "mm_hidden_size": dv,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
              "image_aspect_ratio": "square"}
    (out / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    torch.save({"model.mm_projector.0.weight": torch.randn(d, dv, generator=g) * 0.2,
                "model.mm_projector.0.bias": torch.zeros(d),
                "model.mm_projector.2.weight": torch.randn(d, d, generator=g) * 0.2,
                "model.mm_projector.2.bias": torch.zeros(d)}, out / "mm_projector.bin")
    return out


def test_image_token_states_are_the_refined_target_of_the_forward(tiny_llava, tmp_path):
    from PIL import Image

    from basic_plugin.lab.channels import image_token_states, main
    from basic_plugin.lab.lens import load_llava, pixel_batch, prefix_embeds
    from basic_plugin.lab.tiny import IMAGE_SIZE

    run = projector_checkpoint(tiny_llava, tmp_path / "run")
    tok, model, proc = load_llava(run, tiny_llava["lm"])
    files = []
    for i in range(3):
        f = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(f)
        files.append(f)
    v, vhat = image_token_states(model, tok, proc, files, depth=2, batch=2)
    with torch.no_grad():
        embeds, mask = prefix_embeds(model, tok, pixel_batch(files, proc, model.config))
        hs = model.get_model()(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    # l^2 weights for k = 2: 1/5 and 4/5
    assert torch.allclose(vhat, (hs[1][mask].double() / 5 + 4 * hs[2][mask].double() / 5).float(), atol=1e-5)
    assert torch.allclose(v, hs[0][mask]) and v.shape[0] == mask.sum() and mask[0].sum() > 1
    assert main(["--llm", str(tiny_llava["lm"]), "--runs", str(run), "--images", *map(str, files), "--depth", "2",
                 "--top", "2", "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    saved = report["images"][str(run)]
    assert saved["tokens"] == v.shape[0] and saved["cos"] == pytest.approx(channel_shares(v, vhat, 2)["cos"], rel=1e-4)
    assert saved["candidates"]["paper"]["per_token"] == pytest.approx(_top_share(vhat.double().numpy(), 2), rel=1e-6)
    assert (tmp_path / "c.png").stat().st_size > 10_000


def _top_share(x, top):
    """Mean over rows of the part of each row's squared norm in its own ``top`` largest channels (numpy)."""
    sq = x ** 2
    return float(np.mean(np.sort(sq, axis=1)[:, -top:].sum(1) / sq.sum(1)))


def test_concentration_against_numpy():
    from basic_plugin.lab.channels import concentration

    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 13))
    x[:4, 5] *= 30
    c = concentration(torch.tensor(x), top=3)
    assert c["per_token"] == pytest.approx(_top_share(x, 3))
    pooled = (x ** 2).sum(0)
    assert c["pooled"] == pytest.approx(np.sort(pooled)[-3:].sum() / pooled.sum())
    assert c["pooled_channels"][0] == 5 and c["uniform"] == pytest.approx(3 / 13)
    assert c["per_token_q10_q50_q90"][1] == pytest.approx(np.quantile(np.sort(x ** 2, 1)[:, -3:].sum(1) / (x ** 2).sum(1), 0.5))


def test_channels_command_on_the_llm_alone(tiny_llava, tmp_path):
    """No projector, no image: the text probe's per-layer table, what auto would drop (the statistic recomputed
    here), and each candidate target's concentration, standardised and RMSNorm-read written out by hand."""
    from basic_plugin.basic.channels import probe_ids
    from basic_plugin.lab.channels import _llm_only, main

    assert main(["--llm", str(tiny_llava["lm"]), "--depth", "2", "--drop", "3", "--json", str(tmp_path / "t.json"),
                 "--plot", str(tmp_path / "t.png")]) == 0
    assert torch.is_grad_enabled()  # the command leaves this process's gradient mode as it found it
    report = json.loads((tmp_path / "t.json").read_text())["text"]
    tokenizer, model = _llm_only(Path(tiny_llava["lm"]))
    with torch.no_grad():
        hs = model.get_model()(input_ids=probe_ids(tokenizer), output_hidden_states=True).hidden_states
    h = [hs[l][0].double().numpy() for l in (1, 2)]
    mags = np.mean([np.abs(x).mean(0) for x in h], axis=0)
    ratio = mags / np.median(mags)
    assert report["drop"]["channels"] == list(np.argsort(-ratio, kind="stable")[:3])
    assert report["drop"]["ratios"] == pytest.approx(sorted(ratio)[::-1][:3])
    assert [r["layer"] for r in report["layers"]] == [1, 2] and report["tokens"] == h[0].shape[0]
    vhat = h[0] / 5 + 4 * h[1] / 5
    std = (vhat - vhat.mean(0)) / vhat.std(0)
    assert report["candidates"]["standardize"]["per_token"] == pytest.approx(_top_share(std, 5), rel=1e-6)
    dropped = vhat.copy()
    dropped[:, report["drop"]["channels"]] = 0
    assert report["candidates"]["drop"]["per_token"] == pytest.approx(_top_share(dropped, 5), rel=1e-6)
    layers = model.get_model().layers
    eps = model.config.rms_norm_eps

    def rms(x, layer):
        g = layers[layer].input_layernorm.weight.detach().double().numpy()
        return g * x / np.sqrt((x ** 2).mean(1, keepdims=True) + eps)

    read = rms(h[0], 1) / 5 + 4 * rms(h[1], 2) / 5
    assert report["candidates"]["llm_read"]["per_token"] == pytest.approx(_top_share(read, 5), rel=1e-4)
    assert (tmp_path / "t.png").is_file()
