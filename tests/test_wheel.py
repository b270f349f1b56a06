"""The wheel installs next to an existing LLaVA and trains with BASIC, from the install alone.

What a user does, checked end to end:

1. ``python -m build --no-isolation`` makes an sdist and, from that sdist, a wheel. The build
   runs on a copy of the source tree (the files git sees, untracked ones included) in a temp
   folder, so nothing is written into the repository and a stale ``*.egg-info`` cannot leak
   into the sdist. ``--no-isolation`` builds with this environment's setuptools: no resolver
   runs, so nothing can pull torch.
2. A fresh virtual environment that already holds LLaVA and the CPU working set: ``python -m
   venv --without-pip`` (the same interpreter), then every file of this environment's
   site-packages is hard-linked into the new one, except basic-llava's own installed files
   (its dist-info, and the editable finder that points at the repository). The packages are
   then really installed *in* the new environment (pip sees them as its own and could upgrade
   or remove them there: unlinking a hard link leaves this environment alone), which
   ``--system-site-packages`` or a ``.pth`` pointing at ``.venv`` would not prove. Hard links
   cost about a second for 1.4 GB; where the temp folder is on another file system the files
   are copied instead (slower, same result). Before the install, ``basic_plugin`` must not be
   importable there.
3. ``python -m pip install <wheel>``, plain: not editable, dependencies resolved. A dry run
   with ``--report`` first must plan to install basic-llava alone (so a broken pin fails here
   instead of downloading a multi-GB torch); the real install must download nothing, and the
   versions of every distribution, torch, transformers and deepspeed among them, are the same
   before and after; torch's files are still the very same files.
4. From a working directory outside the repository, with no ``PYTHONPATH`` to it,
   ``basic_plugin`` imports from the new site-packages, ``basic-llava doctor`` (the console
   script the wheel installed) finds the stack and the wheel's plugins, and a 2-step
   ``--basic True`` training of the tiny model (``basic_plugin.lab.tiny``, built in tmp) logs
   ``basic_das`` through both routes: ``python -m basic_plugin.train`` (unpatched LLaVA) and
   LLaVA's own ``python -m llava.train.train`` on a copy of the ``llava`` package patched with
   ``patches/0001-plugin-hooks.patch`` (as in tests/test_patches.py) first on ``PYTHONPATH``;
   there LLaVA's own plugin manager finds the wheel's ``basic-llava`` entry point.

The whole file takes about a minute on 2 cores (the two trainings run side by side).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest

from basic_plugin.lab.launch import CHILD_ENV, DIST_VARS, OFFLINE_ENV
from basic_plugin.lab.tiny import tiny_train_args
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.wheel

DIST = "basic-llava"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
CODE_PATCH = REPO_ROOT / "patches" / "0001-plugin-hooks.patch"
STEPS = 2
#: The heavy pins a plain ``pip install`` must leave alone (checked by name; all others too).
HEAVY = ("torch", "transformers", "deepspeed", "tokenizers", "accelerate", "llava-torch")
#: Files the repository ignores or that a build makes; never part of the source copy.
_NOT_SOURCE = {".git", ".venv", "build", "dist", ".pytest_cache", "runs", ".cache", ".whl", "__pycache__"}

PROBE = """
import importlib.metadata as m, json, sys
import basic_plugin, llava
print(json.dumps({"basic_plugin": basic_plugin.__file__, "llava": llava.__file__, "path": sys.path,
                  "prefix": sys.prefix,
                  "llava_entry_points": sorted((ep.name, ep.value, ep.dist.name)
                                               for ep in m.entry_points(group="llava"))}))
"""
VERSIONS = """
import importlib.metadata as m, json
print(json.dumps({d.metadata["Name"].lower().replace("_", "-"): d.version for d in m.distributions()}))
"""


def _run(cmd, *, cwd, env=None, timeout=300):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _ok(res) -> str:
    assert res.returncode == 0, f"{res.args}\n--- stdout ---\n{res.stdout[-6000:]}\n--- stderr ---\n{res.stderr[-6000:]}"
    return res.stdout


# ----------------------------------------------------------------------------- build


def _source_files() -> list:
    """The working tree as git sees it (tracked and untracked, not ignored), or a filtered walk."""
    res = None
    if (REPO_ROOT / ".git").exists() and shutil.which("git"):
        res = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT)
    if res is not None and res.returncode == 0:
        names = [n for n in res.stdout.split("\0") if n]
    else:
        names = [str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.rglob("*") if p.is_file()]
    keep = []
    for name in names:
        parts = Path(name).parts
        if set(parts) & _NOT_SOURCE or any(p.endswith((".egg-info", ".pyc")) for p in parts):
            continue
        if (REPO_ROOT / name).is_file():  # a tracked file deleted in the working tree is not there
            keep.append(name)
    return keep


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``{"sdist", "wheel", "source"}``: ``python -m build --no-isolation`` on a copy of the tree."""
    root = tmp_path_factory.mktemp("wheel_build")
    source = root / "src"
    for name in _source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    out = root / "dist"
    res = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source], cwd=root, timeout=300)
    _ok(res)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == len(wheels) == 1, sorted(out.iterdir())
    assert wheels[0].name == f"basic_llava-{VERSION}-py3-none-any.whl"
    assert sdists[0].name == f"basic_llava-{VERSION}.tar.gz"
    return {"sdist": sdists[0], "wheel": wheels[0], "source": source}


def _package_files(source: Path) -> set:
    """The files of ``basic_plugin`` in the source tree: its modules and its DeepSpeed configs."""
    pkg = source / "basic_plugin"
    files = {p.relative_to(source).as_posix() for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}
    files |= {p.relative_to(source).as_posix() for p in (pkg / "configs").glob("*.json")}
    assert "basic_plugin/configs/zero2.json" in files and "basic_plugin/configs/zero3.json" in files
    return files


def test_sdist_holds_the_package_and_configs(built):
    prefix = f"basic_llava-{VERSION}/"
    with tarfile.open(built["sdist"]) as tar:
        names = {m.name[len(prefix):] for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)}
        config = json.loads(tar.extractfile(prefix + "basic_plugin/configs/zero3.json").read())
    assert _package_files(built["source"]) <= names
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names
    # what the README and INTEGRATION.md send a reader to: the docs, the upstream patches, the licence
    documents = {"INTEGRATION.md", "LICENSE", "constraints.txt", "constraints-gpu.txt", "docs/PLUGIN_HOOKS.md",
                 "docs/RELIABILITY.md", "docs/DECISIONS.md", "docs/RESULTS.md", "docs/PERFORMANCE.md",
                 "patches/README.md", "patches/0001-plugin-hooks.patch", "patches/0002-scripts-basic-flag.patch",
                 "patches/build_patch.py", "patches/template/plugins.py.in", "examples/projector_norm_plugin.py"}
    assert documents <= names, sorted(documents - names)
    assert {f"docs/{p.relative_to(REPO_ROOT / 'docs').as_posix()}" for p in (REPO_ROOT / "docs" / "img").iterdir()} <= names
    assert config == json.loads((REPO_ROOT / "basic_plugin" / "configs" / "zero3.json").read_text())


def test_wheel_holds_the_package_its_data_and_entry_points(built):
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        info = f"basic_llava-{VERSION}.dist-info/"
        entry_points = whl.read(info + "entry_points.txt").decode()
        meta = whl.read(info + "METADATA").decode()
    code = {n for n in names if not n.startswith(info)}
    assert info + "licenses/LICENSE" in names and "License-Expression: Apache-2.0" in meta
    # basic_plugin and nothing else: no tests, scripts or patches in site-packages
    assert code == _package_files(built["source"]), sorted(code ^ _package_files(built["source"]))
    for group, eps in [("console_scripts", PYPROJECT["project"]["scripts"]),
                       *PYPROJECT["project"]["entry-points"].items()]:
        assert f"[{group}]" in entry_points
        for name, value in eps.items():
            assert f"{name} = {value}" in entry_points, (group, name)
    requires = re.findall(r"^Requires-Dist: (\S+)", meta, re.M)
    assert requires and not {r.split(";")[0] for r in requires} & {"torch", "llava-torch", "transformers",
                                                                 "deepspeed"}, requires


# ----------------------------------------------------------------------------- the fresh environment


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _own_files(site: Path, dists: tuple = (DIST,)) -> set:
    """Paths (relative to ``site``) of the installed files of the distributions ``dists`` (basic-llava's), if any."""
    own = set()
    for dist in metadata.distributions(path=[str(site)]):
        if (dist.metadata["Name"] or "").lower().replace("_", "-") in dists:
            own |= {Path(os.path.normpath(str(f))).as_posix() for f in dist.files or ()}
    return own


def _populate(site: Path, target: Path, keep=None, *, leave_out: tuple = (DIST,)) -> None:
    """Hard-link (or copy) ``site`` into ``target``, leaving out the files of the distributions ``leave_out``
    (basic-llava's own by default) and, with ``keep``, every top-level entry for which ``keep(name)`` is false."""
    own = _own_files(site, leave_out)
    for top, dirs, files in os.walk(site):
        rel_top = Path(top).relative_to(site)
        dirs[:] = [d for d in dirs if (rel_top / d).as_posix() not in own
                   and (keep is None or rel_top != Path(".") or keep(d))]
        for name in files:
            rel = (rel_top / name).as_posix()
            if rel in own or (keep is not None and rel_top == Path(".") and not keep(name)):
                continue
            src, dst = Path(top) / name, target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                _link_or_copy(str(src), str(dst))


def _child_env(venv: Path, **extra) -> dict:
    """This environment without PYTHONPATH or a virtualenv, the new one first on PATH, offline."""
    env = {k: v for k, v in os.environ.items()
           if k not in DIST_VARS and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(OFFLINE_ENV)
    env.update(CHILD_ENV)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
    """A new virtual environment with the working set and the wheel installed by ``pip install``."""
    import torch

    site = Path(sysconfig.get_path("purelib"))
    for module in (torch, __import__("llava"), __import__("pluggy")):
        if not Path(module.__file__).resolve().is_relative_to(site.resolve()):
            pytest.skip(f"{module.__name__} is not in this environment's site-packages ({site})")
    root = tmp_path_factory.mktemp("wheel_venv")
    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root))
    python = venv / "bin" / "python"
    target = Path(_ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           cwd=root)).strip())
    assert target.is_relative_to(venv) and target != site
    _populate(site, target)

    elsewhere = root / "elsewhere"  # the working directory of every command: not the repository
    elsewhere.mkdir()
    env = _child_env(venv)
    absent = _run([python, "-c", "import basic_plugin"], cwd=elsewhere, env=env)
    assert absent.returncode != 0 and "No module named 'basic_plugin'" in absent.stderr, absent.stderr
    before = json.loads(_ok(_run([python, "-c", VERSIONS], cwd=elsewhere, env=env)))

    report = root / "pip-report.json"
    dry = _run([python, "-m", "pip", "install", "--dry-run", "--report", report, built["wheel"]],
               cwd=elsewhere, env=env)
    _ok(dry)
    planned = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    assert planned == [(DIST, VERSION)], planned

    pip = _run([python, "-m", "pip", "install", built["wheel"]], cwd=elsewhere, env=env, timeout=600)
    _ok(pip)
    after = json.loads(_ok(_run([python, "-c", VERSIONS], cwd=elsewhere, env=env)))
    return {"root": root, "venv": venv, "python": python, "site": target, "source_site": site, "env": env,
            "cwd": elsewhere, "before": before, "after": after, "pip": pip.stdout + pip.stderr}


def test_pip_install_adds_basic_llava_and_touches_nothing_else(venv):
    before, after, output = venv["before"], venv["after"], venv["pip"]
    for name in HEAVY:
        assert name in before, (name, sorted(before))
        assert after[name] == before[name], (name, before[name], after[name])
    assert DIST not in before and after.pop(DIST) == VERSION
    assert after == before  # every other distribution: same version, none added, none removed
    assert f"Successfully installed {DIST}-{VERSION}" in output, output
    assert not re.search(r"^\s*(Downloading|Uninstalling)\b", output, re.M | re.I), output
    assert not re.search(r"^\s*Collecting (?!basic.llava)", output, re.M | re.I), output
    assert not re.search(r"torch-[0-9][^\s]*\.whl", output), output
    # torch was not reinstalled: its files are the very files this environment has (hard links)
    ours = venv["source_site"] / "torch" / "__init__.py"
    theirs = venv["site"] / "torch" / "__init__.py"
    if os.stat(theirs).st_nlink > 1:
        assert os.stat(theirs).st_ino == os.stat(ours).st_ino


def test_installed_wheel_is_what_imports(venv):
    """From outside the repository, ``basic_plugin`` and the ``llava`` entry points come from the wheel."""
    probe = json.loads(_ok(_run([venv["python"], "-c", PROBE], cwd=venv["cwd"], env=venv["env"])))
    assert Path(probe["basic_plugin"]).is_relative_to(venv["site"]), probe["basic_plugin"]
    assert Path(probe["llava"]).is_relative_to(venv["site"]), probe["llava"]
    assert Path(probe["prefix"]) == venv["venv"]
    repo = str(REPO_ROOT.resolve())
    assert not any(p and str(Path(p).resolve()).startswith(repo) for p in probe["path"]), probe["path"]
    wanted = sorted((name, value, DIST) for name, value in PYPROJECT["project"]["entry-points"]["llava"].items())
    assert [tuple(ep) for ep in probe["llava_entry_points"]] == wanted
    # the host and BASIC, no lab code: a LLaVA that loads checkpoints consults nothing else of ours
    assert [(name, value) for name, value, _ in probe["llava_entry_points"]] == [
        ("basic", "basic_plugin.basic.plugin"), ("basic-llava", "basic_plugin.host.native")]
    assert (venv["site"] / "basic_plugin" / "configs" / "zero2.json").is_file()
    assert not (venv["site"] / "tests").exists()


def test_doctor_runs_from_the_installed_wheel(venv):
    script = venv["venv"] / "bin" / "basic-llava"
    assert script.is_file() and script.read_text().startswith(f"#!{venv['python']}")
    res = _run(["basic-llava", "doctor", "--json"], cwd=venv["cwd"], env=venv["env"], timeout=300)
    report = json.loads(_ok(res))
    checks = {c["name"]: c for c in report["checks"]}
    bad = [c for c in report["checks"] if c["status"] not in ("ok", "info")]
    assert not bad, bad
    assert checks["torch"]["found"] == venv["before"]["torch"]
    assert checks["plugin basic"]["found"] == "basic_plugin.basic.plugin"
    assert checks["plugin basic-llava"]["found"] == "basic_plugin.host.native"
    assert _ok(_run(["basic-llava", "doctor"], cwd=venv["cwd"], env=venv["env"], timeout=300)).startswith(
        "basic-llava doctor")


# ----------------------------------------------------------------------------- training through the wheel


@pytest.fixture(scope="module")
def patched_llava(venv):
    """A copy of the new environment's ``llava`` package with ``0001-plugin-hooks.patch`` applied."""
    site = venv["root"] / "patched_site"
    site.mkdir()
    shutil.copytree(venv["site"] / "llava", site / "llava", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(site.parent))  # never a repository above
    for cmd in (["git", "apply", "--check", CODE_PATCH], ["git", "apply", CODE_PATCH]):
        _ok(_run(cmd, cwd=site, env=env))
    assert (site / "llava" / "plugins.py").is_file()
    return site


def _train_in(venv: dict, module: str, out: Path, tiny_llava, data, **extra) -> dict:
    """``python -m module`` in the environment ``venv``, from outside the repository: STEPS ``--basic True`` steps
    of the tiny model (seeded before the model is built, so every route starts from the same projector)."""
    args = tiny_train_args(tiny_llava, *data, out, stage="pretrain", max_steps=STEPS,
                           extra=("--basic", "True", "--seed_model_init", "True"))
    env = _child_env(venv["venv"], OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, **extra)
    res = _run([venv["python"], "-m", module, *args], cwd=venv["cwd"], env=env, timeout=600)
    output = res.stdout + res.stderr
    assert res.returncode == 0, f"{module}: exit {res.returncode}\n{output[-8000:]}"
    probe = json.loads(_ok(_run([venv["python"], "-c", PROBE], cwd=venv["cwd"], env=env)))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {"output": output, "history": history, "steps": [e for e in history if "loss" in e], "probe": probe}


@pytest.fixture(scope="module")
def trained(venv, patched_llava, tiny_llava, tiny_data_plain):
    """Both routes, 2 steps each with ``--basic True``, side by side (one thread each)."""
    plan = {
        "runtime": ("basic_plugin.train", {}),
        "patched": ("llava.train.train", {"PYTHONPATH": patched_llava, "LLAVA_PLUGINS_TRACE": "1"}),
    }

    def run(name):
        module, extra = plan[name]
        return _train_in(venv, module, venv["root"] / "runs" / name, tiny_llava, tiny_data_plain, **extra)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(plan, pool.map(run, plan)))


@pytest.mark.parametrize("route", ["runtime", "patched"])
def test_basic_trains_from_the_wheel(trained, venv, patched_llava, route):
    run = trained[route]
    steps = [e for e in run["history"] if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    for entry in steps:
        assert {"lm_loss", "basic_das", "basic_sds"} <= set(entry), entry
        assert entry["basic_das"] > 0
    assert "basic_das" in run["output"]
    # what ran: the wheel's basic_plugin, and LLaVA from the new environment or the patched copy
    assert Path(run["probe"]["basic_plugin"]).is_relative_to(venv["site"])
    llava_home = patched_llava if route == "patched" else venv["site"]
    assert Path(run["probe"]["llava"]).is_relative_to(llava_home), run["probe"]["llava"]
    if route == "patched":  # LLaVA's own plugin manager found the wheel's host entry point
        assert "[llava-plugins] llava_train_classes -> ['basic-llava']" in run["output"]
        assert "[llava-plugins] llava_objective -> ['basic']" in run["output"]


# ----------------------------------------------------------------------------- building without the training stack
#: what ``python -m build --no-isolation`` needs: the build frontend and the backend pyproject.toml names, nothing else
BUILD_TOOLS = ("build", "pyproject_hooks", "packaging", "setuptools", "_distutils_hack", "distutils-precedence.pth")


def _is_build_tool(name: str) -> bool:
    return name in BUILD_TOOLS or any(name.startswith(f"{tool}-") and name.endswith(".dist-info")
                                      for tool in BUILD_TOOLS)


def test_the_wheel_builds_without_the_training_stack(built, tmp_path_factory):
    """The pure-Python wheel and sdist build in an environment that holds only the build tools (no torch, no
    LLaVA, nothing of the 1.4 GB training set), and equal the ones built in the training environment."""
    root = tmp_path_factory.mktemp("build_only")
    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root))
    python = venv / "bin" / "python"
    target = Path(_ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root)).strip())
    _populate(Path(sysconfig.get_path("purelib")), target, keep=_is_build_tool)
    env = _child_env(venv)
    for absent in ("torch", "llava", "transformers", "pluggy", "basic_plugin"):
        res = _run([python, "-c", f"import {absent}"], cwd=root, env=env)
        assert res.returncode != 0 and "No module named" in res.stderr, absent
    out = root / "dist"
    _ok(_run([python, "-m", "build", "--no-isolation", "--outdir", out, built["source"]], cwd=root, env=env))
    (wheel,), (sdist,) = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert wheel.name == built["wheel"].name and sdist.name == built["sdist"].name
    with zipfile.ZipFile(wheel) as ours, zipfile.ZipFile(built["wheel"]) as theirs:
        assert sorted(ours.namelist()) == sorted(theirs.namelist())
        for name in ours.namelist():
            if not name.endswith("RECORD"):
                assert ours.read(name) == theirs.read(name), name
    with tarfile.open(sdist) as ours, tarfile.open(built["sdist"]) as theirs:
        assert sorted(ours.getnames()) == sorted(theirs.getnames())


# ----------------------------------------------------------------------------- next to a LLaVA git checkout
LLAVA_DIR = os.environ.get("LLAVA_DIR")
LLAVA_COMMIT = "c121f04"
#: the parts of the checkout the route uses: the package, its scripts, and what ``pip install -e`` reads
LLAVA_FILES = ("llava", "scripts", "pyproject.toml", "README.md", "LICENSE")
SCRIPTS_PATCH = REPO_ROOT / "patches" / "0002-scripts-basic-flag.patch"


@pytest.fixture(scope="module")
def git_llava_venv(built, tmp_path_factory):
    """A fresh environment with LLaVA installed from a git checkout (``pip install --no-deps -e``, the CPU route
    of INTEGRATION.md) instead of the llava-torch wheel, then the wheel installed plainly."""
    if not LLAVA_DIR:
        pytest.skip("LLAVA_DIR (a LLaVA git repository) not set")
    root = tmp_path_factory.mktemp("git_llava")
    checkout = root / "LLaVA"
    checkout.mkdir()
    # what installing LLaVA and applying the patches reads (works for a checkout and for a mirror without the
    # large files of its images/)
    archive = subprocess.run(["git", "-C", LLAVA_DIR, "archive", LLAVA_COMMIT, *LLAVA_FILES], capture_output=True)
    assert archive.returncode == 0, archive.stderr.decode()
    subprocess.run(["tar", "x"], input=archive.stdout, cwd=checkout, check=True)
    git_env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(root), GIT_AUTHOR_NAME="x", GIT_AUTHOR_EMAIL="x@x",
                   GIT_COMMITTER_NAME="x", GIT_COMMITTER_EMAIL="x@x")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", LLAVA_COMMIT]):
        _ok(_run(cmd, cwd=checkout, env=git_env))
    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root))
    python = venv / "bin" / "python"
    site = Path(sysconfig.get_path("purelib"))
    target = Path(_ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root)).strip())
    _populate(site, target, leave_out=(DIST, "llava-torch"))  # the CPU working set without any LLaVA
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = _child_env(venv)
    absent = _run([python, "-c", "import llava"], cwd=elsewhere, env=env)
    assert absent.returncode != 0 and "No module named 'llava'" in absent.stderr, absent.stderr
    _ok(_run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", checkout], cwd=elsewhere,
             env=env, timeout=600))
    pip = _ok(_run([python, "-m", "pip", "install", built["wheel"]], cwd=elsewhere, env=env, timeout=600))
    return {"root": root, "venv": venv, "python": python, "env": env, "cwd": elsewhere, "checkout": checkout,
            "git_env": git_env, "site": target, "pip": pip}


def test_next_to_a_llava_git_checkout_both_routes_train(git_llava_venv, tiny_llava, tiny_data_plain):
    """INTEGRATION.md's CPU route for a LLaVA git checkout, end to end: doctor finds the checkout; the unpatched
    checkout trains through ``python -m basic_plugin.train``; after ``git apply`` of both patches, LLaVA's own
    ``python -m llava.train.train`` of the same checkout trains with ``--basic True``."""
    venv = git_llava_venv
    doctor = json.loads(_ok(_run(["basic-llava", "doctor", "--json"], cwd=venv["cwd"], env=venv["env"], timeout=300)))
    checks = {c["name"]: c for c in doctor["checks"]}
    assert checks["llava"]["status"] == "ok" and "git checkout" in checks["llava"]["note"], checks["llava"]
    assert checks["llava hooks"]["found"] == "unpatched"
    runtime = _train_in(venv, "basic_plugin.train", venv["root"] / "runs" / "runtime", tiny_llava, tiny_data_plain)
    assert [e["step"] for e in runtime["steps"]] == list(range(1, STEPS + 1))
    assert all(e["basic_das"] > 0 for e in runtime["steps"])
    assert Path(runtime["probe"]["llava"]).is_relative_to(venv["checkout"])  # the checkout, installed editable
    assert Path(runtime["probe"]["basic_plugin"]).is_relative_to(venv["site"])  # the wheel

    for patch in (CODE_PATCH, SCRIPTS_PATCH):  # as INTEGRATION.md says: git apply (or git am) in the checkout
        _ok(_run(["git", "apply", patch], cwd=venv["checkout"], env=venv["git_env"]))
    assert "--basic True" in (venv["checkout"] / "scripts" / "v1_5" / "pretrain.sh").read_text()
    patched = _train_in(venv, "llava.train.train", venv["root"] / "runs" / "patched", tiny_llava, tiny_data_plain,
                        LLAVA_PLUGINS_TRACE=1)
    assert "[llava-plugins] llava_train_classes -> ['basic-llava']" in patched["output"]
    assert [set(e) for e in patched["steps"]] == [set(e) for e in runtime["steps"]]
    for ours, theirs in zip(patched["steps"], runtime["steps"]):  # the same classes, the same arithmetic
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-8)
