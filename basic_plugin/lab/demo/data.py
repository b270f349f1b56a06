"""``basic-llava data``: the demo's LLaVA-format datasets, from real images that ship in packages.

* Fashion-MNIST (Debian package ``dataset-fashion-mnist``, MIT): 28 x 28 grayscale photos of
  clothing in 10 classes, read from ``/usr/share/datasets/fashion-mnist/*-idx*-ubyte.gz``,
  upscaled (bicubic) to the vision tower's resolution and written as RGB PNG. Each image gets a
  short caption built from its class name and one of a few templates ("A photo of a sneaker.").
  ``train.json`` comes from the official train split, ``test.json`` (held out, class-balanced)
  from the official test split; test records also carry ``label`` and ``class`` (LLaVA ignores
  extra keys).
* Packaged photos (``photos.json``): matplotlib's ``grace_hopper.jpg`` and gift-box picture
  always; scikit-image's ``skimage/data`` photos and scikit-learn's two sample images when those
  packages are installed (nothing is installed for them). Captions are hand-written; they are
  for a qualitative look only (never trained on).

Every record is validated with :mod:`basic_plugin.host.records` before it is written.
Layout under ``--out`` (default ``runs/demo/data``)::

    images/train/*.png  images/test/*.png  images/photos/*.png
    train.json  test.json  photos.json  meta.json

A second call with the same arguments finds ``meta.json`` unchanged and does nothing.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from basic_plugin.host.usage import CommandParser
from basic_plugin.lab.argv import strip_separator

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_PACKAGE = "dataset-fashion-mnist"
INSTALL_HINT = f"apt-get install {FMNIST_PACKAGE}"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: Fashion-MNIST's official class names (label order) and the phrase used in captions.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
PHRASES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
           "sneaker", "bag", "ankle boot")

#: Caption templates; ``{a}`` is the article ("a"/"an"), ``{A}`` the capitalised one.
TEMPLATES = (
    "A photo of {a} {x}.",
    "A black and white photo of {a} {x}.",
    "{A} {x} on a black background.",
    "A small grayscale picture of {a} {x}.",
    "This is {a} {x}.",
)
#: The template whose captions the zero-shot evaluation scores (also one of the training ones).
EVAL_TEMPLATE = TEMPLATES[0]

#: The human turn of each record (LLaVA's ``plain`` template keeps only ``<image>`` from it).
PROMPTS = ("Describe the image briefly.", "What is in the picture?", "Write a short caption for the image.")

#: (package, path inside the package, file name to write, hand-written caption)
PHOTOS = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper",
     "A portrait of a woman in a dark navy uniform with medals."),
    ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png", "gift_box",
     "A blue gift box tied with a silver ribbon."),
    ("skimage", "data/astronaut.png", "astronaut",
     "An astronaut in a white spacesuit in front of a flag."),
    ("skimage", "data/chelsea.png", "chelsea", "A tabby cat looking to the side."),
    ("skimage", "data/coffee.png", "coffee", "A cup of coffee on a saucer."),
    ("skimage", "data/rocket.jpg", "rocket", "A rocket on its launch pad."),
    ("skimage", "data/motorcycle_left.png", "motorcycle", "A motorcycle parked indoors."),
    ("skimage", "data/camera.png", "camera", "A black and white photo of a man with a camera."),
    ("sklearn", "datasets/images/china.jpg", "china", "A temple with a curved roof among trees."),
    ("sklearn", "datasets/images/flower.jpg", "flower", "A close-up of a flower."),
)


# -- captions -------------------------------------------------------------------------------
def article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def caption(label: int, template: str = EVAL_TEMPLATE) -> str:
    """The caption of class ``label`` with ``template`` ("A photo of a sneaker.")."""
    phrase = PHRASES[label]
    a = article(phrase)
    return template.format(a=a, A=a.capitalize(), x=phrase)


def class_captions(template: str = EVAL_TEMPLATE) -> List[str]:
    """The 10 candidate captions of the zero-shot evaluation, in label order."""
    return [caption(k, template) for k in range(len(CLASSES))]


def make_record(rid: str, image: str, text: str, prompt: str = PROMPTS[0], **extra) -> dict:
    """A one-round LLaVA record: ``<image>`` + prompt from the human, ``text`` from gpt."""
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + prompt},
                              {"from": "gpt", "value": text}], **extra}


# -- idx files ------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: ("B", 1), 0x09: ("b", 1), 0x0B: (">i2", 2), 0x0C: (">i4", 4), 0x0D: (">f4", 4), 0x0E: (">f8", 8)}


def read_idx(path) -> "np.ndarray":
    """Read an idx file (gzip or plain): 2 zero bytes, a type byte, a rank byte, big-endian dims, data."""
    import numpy as np

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4]!r})")
    code, rank = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx element type 0x{code:02x}")
    dims = struct.unpack(f">{rank}I", raw[4:4 + 4 * rank])
    dtype, size = _IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    start = 4 + 4 * rank
    if len(raw) - start != count * size:
        raise ValueError(f"{path}: {len(raw) - start} data bytes, header says {count * size}")
    return np.frombuffer(raw, dtype=np.dtype(dtype), count=count, offset=start).reshape(dims)


def fmnist_available(folder=FMNIST_DIR) -> bool:
    return all((Path(folder) / f).is_file() for pair in FMNIST_FILES.values() for f in pair)


def load_fmnist(split: str, folder=FMNIST_DIR) -> Tuple["np.ndarray", "np.ndarray"]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of the official ``train`` or ``test`` split."""
    if not fmnist_available(folder):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder}. Install it with:\n    {INSTALL_HINT}\n"
            f"(as root; `sudo {INSTALL_HINT}` otherwise; scripts/demo.sh does this for you)")
    images_file, labels_file = FMNIST_FILES[split]
    images = read_idx(Path(folder) / images_file)
    labels = read_idx(Path(folder) / labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels


def balanced_indices(labels, n: int, seed: int, classes: int = len(CLASSES)) -> List[int]:
    """``n`` indices (as equal per class as possible, shuffled), drawn with ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    per = [n // classes + (1 if k < n % classes else 0) for k in range(classes)]
    chosen: List[int] = []
    for k in range(classes):
        pool = np.flatnonzero(np.asarray(labels) == k)
        if per[k] > len(pool):
            raise ValueError(f"class {k} has {len(pool)} images, {per[k]} asked for")
        chosen += rng.choice(pool, size=per[k], replace=False).tolist()
    order = rng.permutation(len(chosen))
    return [int(chosen[i]) for i in order]


def to_rgb_png(array, path: Path, size: int) -> None:
    """A 2-D uint8 array -> an RGB PNG of ``size`` x ``size`` (bicubic)."""
    from PIL import Image

    img = Image.fromarray(array, mode="L")
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    img.convert("RGB").save(path, format="PNG")


# -- packaged photos --------------------------------------------------------------------------
def package_dir(name: str) -> Optional[Path]:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_photos() -> List[Tuple[str, Path, str]]:
    """``(name, path, caption)`` of the packaged photos present on this machine."""
    found = []
    for package, rel, name, text in PHOTOS:
        root = package_dir(package)
        if root is not None and (root / rel).is_file():
            found.append((name, root / rel, text))
    return found


# -- building ---------------------------------------------------------------------------------
def build_dataset(out, *, train: int = 800, test: int = 500, size: int = 112, seed: int = 0,
                  fmnist_dir=FMNIST_DIR, progress: bool = True, val: int = 0) -> Dict[str, str]:
    """Write the datasets (see module doc); return ``{"image_folder", "train", "test", "photos", "meta"}``
    (and ``"val"``: ``val`` class-balanced images of the official train split that are not trained on,
    for choosing settings without touching the test split)."""
    from tqdm.auto import tqdm

    from basic_plugin.host.records import load_records, write_records

    out = Path(out)
    image_folder = out / "images"
    paths = {"image_folder": str(image_folder), "train": str(out / "train.json"), "test": str(out / "test.json"),
             "photos": str(out / "photos.json"), "meta": str(out / "meta.json")}
    if val:
        paths["val"] = str(out / "val.json")
    wanted = {"format": 1, "train": train, "test": test, "size": size, "seed": seed,
              "fmnist_dir": str(fmnist_dir), "templates": list(TEMPLATES), "phrases": list(PHRASES),
              "photos": [name for name, _, _ in packaged_photos()], **({"val": val} if val else {})}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("params") == wanted:
                for key in ("train", "test", "photos", *(("val",) if val else ())):  # still intact?
                    load_records(paths[key], image_folder)
                return paths
        except (ValueError, OSError):
            pass

    train_images, train_labels = load_fmnist("train", fmnist_dir)
    test_images, test_labels = load_fmnist("test", fmnist_dir)
    train_idx = balanced_indices(train_labels, train, seed)
    test_idx = balanced_indices(test_labels, test, seed + 1)
    val_idx = []
    if val:
        import numpy as np

        rest = np.setdiff1d(np.arange(len(train_labels)), np.asarray(train_idx))
        val_idx = [int(rest[i]) for i in balanced_indices(train_labels[rest], val, seed + 3)]
    photos = packaged_photos()

    for sub in ("train", "test", "photos"):
        (image_folder / sub).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(train_idx) + len(test_idx) + len(val_idx) + len(photos), desc="demo data", unit="img",
               disable=not progress)
    import numpy as np

    rng = np.random.default_rng(seed + 2)
    train_records = []
    for i, idx in enumerate(train_idx):
        label = int(train_labels[idx])
        rel = f"train/fmnist_train_{idx:05d}.png"
        to_rgb_png(train_images[idx], image_folder / rel, size)
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        prompt = PROMPTS[int(rng.integers(len(PROMPTS)))]
        train_records.append(make_record(f"fmnist-train-{idx:05d}", rel, caption(label, template), prompt))
        bar.update()
    def evaluation_records(split, images, labels, indices, name):
        """Records with the evaluation caption and the label (the zero-shot test and validation sets)."""
        records = []
        for idx in indices:
            label = int(labels[idx])
            rel = f"{split}/fmnist_{split}_{idx:05d}.png"
            to_rgb_png(images[idx], image_folder / rel, size)
            records.append(make_record(f"fmnist-{name}-{idx:05d}", rel, caption(label), label=label,
                                       **{"class": CLASSES[label]}))
            bar.update()
        return records

    test_records = evaluation_records("test", test_images, test_labels, test_idx, "test")
    val_records = evaluation_records("train", train_images, train_labels, val_idx, "val")
    photo_records = []
    from PIL import Image

    for name, src, text in photos:
        rel = f"photos/{name}.png"
        with Image.open(src) as img:
            img = img.convert("RGB")
            scale = 224 / min(img.size)
            if scale < 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
            img.save(image_folder / rel, format="PNG")
        photo_records.append(make_record(f"photo-{name}", rel, text, source=str(src)))
        bar.update()
    bar.close()

    write_records(train_records, paths["train"], image_folder)
    write_records(test_records, paths["test"], image_folder)
    if val_records:
        write_records(val_records, paths["val"], image_folder)
    if photo_records:
        write_records(photo_records, paths["photos"], image_folder)
    else:  # cannot happen with matplotlib installed; keep the file valid JSON anyway
        Path(paths["photos"]).write_text("[]\n")
    counts = {"train": len(train_records), "test": len(test_records), "photos": len(photo_records),
              "val": len(val_records)}
    meta = {"params": wanted, "counts": counts, "classes": list(CLASSES),
            "eval_template": EVAL_TEMPLATE, "eval_captions": class_captions(),
            "sources": {"fashion_mnist": str(fmnist_dir), "photos": {n: str(p) for n, p, _ in photos}}}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return paths



def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser("data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/data", help="output folder (default: runs/demo/data)")
    parser.add_argument("--train", type=int, default=800, help="training images from the official train split")
    parser.add_argument("--test", type=int, default=500, help="held-out images from the official test split")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (the tower's input size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image draw (default 0)")
    parser.add_argument("--fmnist-dir", default=FMNIST_DIR, help=f"the Fashion-MNIST files (default {FMNIST_DIR})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(strip_separator(argv))
    if not fmnist_available(args.fmnist_dir):
        print(f"basic-llava data: Fashion-MNIST not found in {args.fmnist_dir}.\n"
              f"Install it with:\n    {INSTALL_HINT}\n(as root, or with sudo)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    paths = build_dataset(args.out, train=args.train, test=args.test, size=args.size, seed=args.seed,
                          fmnist_dir=args.fmnist_dir, progress=not args.quiet)
    counts = json.loads(Path(paths["meta"]).read_text())["counts"]
    print(json.dumps(paths, indent=1))
    print(f"[data] {counts['train']} train, {counts['test']} held-out test, {counts['photos']} photos "
          f"in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
