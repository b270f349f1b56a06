"""Time the data pre-flight on a synthetic LLaVA-1.5-sized dataset (665K records, image files present).

    .venv/bin/python scripts/preflight_bench.py [--records 665298] [--workdir /tmp/preflight-bench]

The records follow mix665k's shape: 624K with an image (spread over five source folders like
coco/gqa/ocr_vqa/textvqa/vg), the rest text-only, 1-5 rounds each. Image files are empty
(``fast`` mode checks presence, not content). The tokenizer check uses the tiny test model
(a 256-token sentencepiece vocabulary; LLaVA's Vicuna tokenizer is the same slow
sentencepiece code path). Prints the wall time of ``fast`` on the whole file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FOLDERS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")


def build(workdir: Path, n: int, with_images: int) -> Path:
    data = workdir / f"mix{n}.json"
    if data.is_file():
        return data
    rng = random.Random(0)
    images = workdir / "images"
    records = []
    for i in range(n):
        turns = []
        for r in range(rng.randint(1, 5)):
            question = "What is shown here? " * rng.randint(1, 3)
            turns += [{"from": "human", "value": ("<image>\n" if r == 0 and i < with_images else "") + question},
                      {"from": "gpt", "value": "A short answer about the picture. " * rng.randint(1, 6)}]
        record = {"id": f"{i:07d}", "conversations": turns}
        if i < with_images:
            rel = f"{FOLDERS[i % len(FOLDERS)]}/{i:07d}.jpg"
            path = images / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            record["image"] = rel
        records.append(record)
    data.write_text(json.dumps(records))
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=665298)
    p.add_argument("--with-images", type=int, default=624255)
    p.add_argument("--workdir", default="/tmp/preflight-bench")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from basic_plugin.host.preflight import preflight
    from basic_plugin.lab.tiny import build_tiny_llava

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    data = build(workdir, args.records, min(args.with_images, args.records))
    built = time.monotonic() - start
    tiny = build_tiny_llava(workdir / "tiny", seed=0) if not (workdir / "tiny" / "lm").is_dir() else \
        {"lm": workdir / "tiny" / "lm", "vision": workdir / "tiny" / "vision"}
    model_args = SimpleNamespace(model_name_or_path=str(tiny["lm"]), vision_tower=str(tiny["vision"]), version="v1",
                                 mm_use_im_start_end=False, mm_vision_select_feature="patch")
    data_args = SimpleNamespace(data_path=str(data), image_folder=str(workdir / "images"), is_multimodal=False)
    training_args = SimpleNamespace(model_max_length=2048, output_dir=str(workdir / "out"), dataloader_num_workers=0)
    start = time.monotonic()
    report = preflight(model_args, data_args, training_args, "fast", progress=True)
    seconds = time.monotonic() - start
    print(f"dataset: {args.records} records ({data.stat().st_size / 1e6:.0f} MB JSON), built in {built:.0f} s")
    print(f"fast pre-flight: {seconds:.1f} s for {report.records} records "
          f"({report.tokens.get('checked')} through LLaVA's preprocess), {len(report.bad)} unusable; "
          f"target < 60 s: {'PASS' if seconds < 60 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
