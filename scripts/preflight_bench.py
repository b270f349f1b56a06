"""Time the data pre-flight on a synthetic LLaVA-1.5-sized dataset (665K records, image files present).

    .venv/bin/python scripts/preflight_bench.py [--records 665298] [--mode fast|full] [--ranks N]
                                                [--real-images] [--workdir /tmp/preflight-bench]

The records follow mix665k's shape: 624K with an image (spread over five source folders like
coco/gqa/ocr_vqa/textvqa/vg), the rest text-only, 1-5 rounds each. Image files are empty
(``fast`` mode checks presence, not content) unless ``--real-images``: then each is a 640x480
JPEG of COCO's size (about 100 KB, the same bytes for every file), which ``full`` decodes.
The tokenizer check uses the tiny test model (LLaVA's Vicuna tokenizer is the same slow
sentencepiece code path). ``--ranks N`` runs N processes in a gloo group that share the
check as training's ranks do (each reads the JSON, checks its share in rounds, all gather).
Prints the wall time of the pre-flight on rank 0, from reading the file to the decision.
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


def jpeg_bytes() -> bytes:
    """A 640x480 JPEG of noise (a COCO-sized file: noise does not compress)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def build(workdir: Path, n: int, with_images: int, real: bool) -> Path:
    data = workdir / f"mix{n}{'-real' if real else ''}.json"
    if data.is_file():
        return data
    rng = random.Random(0)
    images = workdir / ("images-real" if real else "images")
    payload = jpeg_bytes() if real else b""
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
            path.write_bytes(payload)
            record["image"] = rel
        records.append(record)
    data.write_text(json.dumps(records))
    return data


def run(rank: int, world: int, port: int, settings: dict) -> None:
    """One rank: the pre-flight of ``settings`` (a process group of ``world`` when > 1); rank 0 prints."""
    from basic_plugin.host.preflight import Share, preflight

    if world > 1:
        import torch.distributed as dist

        os.environ.update(LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model_args = SimpleNamespace(model_name_or_path=settings["lm"], vision_tower=settings["vision"], version="v1",
                                 mm_use_im_start_end=False, mm_vision_select_feature="patch")
    data_args = SimpleNamespace(data_path=settings["data"], image_folder=settings["images"], is_multimodal=False)
    training_args = SimpleNamespace(model_max_length=2048, output_dir=settings["out"], dataloader_num_workers=0)
    start = time.monotonic()
    report = preflight(model_args, data_args, training_args, settings["mode"], progress=rank == 0,
                       share=Share.of_process())
    seconds = time.monotonic() - start
    if rank == 0:
        print(f"{settings['mode']} pre-flight on {world} rank(s): {seconds:.1f} s for {report.records} records "
              f"({report.tokens.get('checked')} through LLaVA's preprocess), {len(report.bad)} unusable; "
              f"{report.records / seconds:.0f} records/s"
              + (f"; target < 60 s: {'PASS' if seconds < 60 else 'MISS'}" if settings["mode"] == "fast" else ""))
        for share in report.shares:
            print(f"  rank {share['rank']}: {share}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=665298)
    p.add_argument("--with-images", type=int, default=624255)
    p.add_argument("--mode", choices=("fast", "full"), default="fast")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--real-images", action="store_true", help="640x480 JPEGs instead of empty files")
    p.add_argument("--workdir", default="/tmp/preflight-bench")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from basic_plugin.lab.tiny import build_tiny_llava

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with_images = min(args.with_images, args.records)
    data = build(workdir, args.records, with_images, args.real_images)
    built = time.monotonic() - start
    tiny = build_tiny_llava(workdir / "tiny", seed=0) if not (workdir / "tiny" / "lm").is_dir() else \
        {"lm": workdir / "tiny" / "lm", "vision": workdir / "tiny" / "vision"}
    print(f"dataset: {args.records} records, {with_images} with an image "
          f"({'640x480 JPEGs' if args.real_images else 'empty files'}), {data.stat().st_size / 1e6:.0f} MB JSON, "
          f"built in {built:.0f} s")
    settings = {"lm": str(tiny["lm"]), "vision": str(tiny["vision"]), "data": str(data), "mode": args.mode,
                "images": str(workdir / ("images-real" if args.real_images else "images")),
                "out": str(workdir / "out")}
    if args.ranks == 1:
        run(0, 1, 0, settings)
    else:
        import torch.multiprocessing as mp

        from basic_plugin.lab.launch import free_port

        mp.spawn(run, args=(args.ranks, free_port(), settings), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
