"""patches/: LLaVA's own plugin support trains exactly like basic-llava's runtime integration.

``0001-plugin-hooks.patch`` is what ``patches/build_patch.py`` makes of its template and the
host's hook specifications (the two LLaVA-side hooks are specified once, in
``basic_plugin/host/hookspecs.py``). It is applied (dry run first, then for real) to a copy of the
installed ``llava`` package in a temp folder put first on PYTHONPATH; the tiny model then
trains 3 steps through the patched LLaVA's own entry module (``python -m llava.train.train``,
CPU, no DeepSpeed) and through the runtime integration (``python -m basic_plugin.train``, on
the unpatched wheel), with the same arguments and the same starting projector:

- with ``--basic True`` both give the same per-step losses and BASIC terms;
- without it, the patched LLaVA gives vanilla LLaVA's losses (``tests._vanilla_train``), with
  basic-llava installed, and with pluggy missing altogether;
- without any plugin (``LLAVA_PLUGINS=``), the patched LLaVA gives vanilla LLaVA's losses;
- with the host kept out (``LLAVA_PLUGINS_BLOCK``, or an ``LLAVA_PLUGINS`` allow-list without
  it), ``--basic`` is an unknown flag again (the patch is inert);
- ``LLAVA_PLUGINS``, ``LLAVA_PLUGINS_BLOCK`` and ``LLAVA_PLUGINS_TRACE`` mean the same to the
  patch's plugin manager as to the host's (``basic_plugin.host.plugins``).

With ``LLAVA_DIR`` set to a LLaVA git repository (checkout or bare), both patches are also
applied to its ``c121f04`` and re-exported with ``git format-patch``: the result must be the
committed files byte for byte.
"""
from __future__ import annotations

import email.utils
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from basic_plugin.lab.tiny import VISION_HIDDEN, tiny_train_args
from tests.helpers import REPO_ROOT, install_distribution, run_training, training_command, training_env

PATCHES = REPO_ROOT / "patches"
CODE_PATCH = PATCHES / "0001-plugin-hooks.patch"
SCRIPTS_PATCH = PATCHES / "0002-scripts-basic-flag.patch"
CODE_FILES = {"llava/plugins.py", "llava/train/train.py", "llava/model/multimodal_encoder/builder.py"}
SCRIPT_FILES = {f"scripts/v1_5/{n}.sh" for n in ("pretrain", "finetune", "finetune_lora")}
HOST_ENTRY_POINT = ("basic-llava", "basic_plugin.host.native")
AUTHOR = "basic-llava developers <basic-llava@users.noreply.github.com>"
LLAVA_COMMIT = "c121f04"
STEPS = 3


def _load(path: Path, name: str):
    """Import the file at ``path`` as a fresh module ``name`` (not via its package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_patch = _load(PATCHES / "build_patch.py", "basic_llava_build_patch")


def _diff_stats(text: str):
    text = text[text.index("\ndiff --git "):]  # the diffs, not the commit message
    files = re.findall(r"^diff --git a/(\S+) b/", text, re.M)
    added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l for l in text.splitlines() if l.startswith("-") and not l.startswith("---")
               and l != "-- "]
    return set(files), added, removed


def _header(text: str) -> dict:
    head = text[:text.index("\n\n")].splitlines()
    fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    fields["From_"] = head[0]
    return fields


def test_patches_are_small_git_format_patches():
    code = CODE_PATCH.read_text()
    assert code.startswith("From ") and "\nSubject: [PATCH 1/2]" in code
    files, added, removed = _diff_stats(code)
    # llava_arch.py and model/builder.py differ between git and the wheel: not touched
    assert files == CODE_FILES
    # 4 + 2 lines in LLaVA's files; llava/plugins.py carries the two hook specs verbatim
    assert len(added) <= 110 and not removed, (len(added), removed)
    assert len(added) - 6 == len(build_patch.plugins_py().splitlines())

    scripts = SCRIPTS_PATCH.read_text()
    assert scripts.startswith("From ") and "\nSubject: [PATCH 2/2]" in scripts
    files, added, removed = _diff_stats(scripts)
    assert files == SCRIPT_FILES
    assert added == ["+    --basic True \\"] * 3 and not removed


def test_patch_headers_are_upstream_ready():
    """``git format-patch --zero-commit`` headers: a real author and date, the same in both."""
    headers = [_header(p.read_text()) for p in (CODE_PATCH, SCRIPTS_PATCH)]
    for h in headers:
        assert h["From_"] == "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001"
        assert h["From"] == AUTHOR
        date = email.utils.parsedate_to_datetime(h["Date"])
        assert date.tzinfo is not None and date.year >= 2025, h["Date"]
        assert "example" not in h["From"] and ".invalid" not in h["From"]
    assert headers[0]["Date"] == headers[1]["Date"]


def test_committed_patch_is_built_from_the_host_hookspecs():
    """One source for the LLaVA-side hook specs: the committed patch is ``build_patch.py``'s output."""
    assert build_patch.build() == CODE_PATCH.read_text(), "run: python patches/build_patch.py"
    res = _run([sys.executable, str(PATCHES / "build_patch.py"), "--check"], REPO_ROOT)
    assert res.returncode == 0, res.stderr
    # the specs appear verbatim, and the host specifies exactly these hooks with these names
    plugins_py = build_patch.plugins_py()
    sources = build_patch.hookspec_sources()
    assert list(sources) == list(build_patch.LLAVA_HOOKS) == ["llava_train_classes", "llava_build_vision_tower"]
    for name, source in sources.items():
        assert source.startswith("@hookspec") and f"def {name}(" in source
        assert plugins_py.count(source) == 1, name
    assert build_patch.build() == build_patch.build()  # deterministic


def test_build_patch_detects_drift(tmp_path):
    """A changed spec makes ``--check`` fail (the guard the test above relies on)."""
    stale = tmp_path / "0001.patch"
    stale.write_text(CODE_PATCH.read_text().replace("or return None.", "or None."))
    assert build_patch.main(["--check", "--output", str(stale)]) == 1
    assert build_patch.main(["--output", str(stale)]) == 0
    assert stale.read_text() == CODE_PATCH.read_text()


def test_diffstat_is_gits(tmp_path):
    """``build_patch.diffstat`` equals ``git diff --stat=72 --summary`` (format-patch's width), long names too."""
    files = {"a/very/long/path/to/some/file/somewhere/deep/down/the/tree/x.py": 150, "b.py": 1,
             "c/" + "d" * 80 + ".py": 4, "llava/plugins.py": 98}  # in git's order
    repo = tmp_path / "repo"
    diff = ""
    for path, n in files.items():
        content = "".join(f"line {i}\n" for i in range(n))
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(content)
        diff += build_patch.new_file_diff(path, content)
    env = _git_env(repo)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
        assert _run(cmd, repo, env).returncode == 0
    res = _run(["git", "-c", "diff.statGraphWidth=0", "diff", "--cached", "--stat=72", "--summary"], repo, env)
    assert res.returncode == 0, res.stderr
    assert build_patch.diffstat(diff) + "\n" == res.stdout


def _git_env(tmp: Path) -> dict:
    # never let git find a repository above the temp folder
    return dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp.parent))


def _run(cmd, cwd, env=None):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


TOWER_ENTRY_POINT = ("dinov2", "basic_plugin.lab.towers.dinov2")


def install_tower_plugin(site: Path) -> Path:
    """The lab's DINOv2 tower as a third-party tower plugin: a ``llava`` entry point installed in ``site``."""
    return install_distribution(site, "dinov2-tower-plugin", entry_points=dict([TOWER_ENTRY_POINT]))


@pytest.fixture(scope="module")
def tower_site(tmp_path_factory):
    """A folder on which the tower plugin is installed (for the managers of this process: ``sys.path``)."""
    return install_tower_plugin(tmp_path_factory.mktemp("tower_site"))


@pytest.fixture(scope="module")
def patched_site(tmp_path_factory):
    """A folder holding a patched copy of the installed ``llava`` package (site-packages layout), with a tower
    plugin installed next to it."""
    import llava

    site = tmp_path_factory.mktemp("patched_site")
    install_tower_plugin(site)
    shutil.copytree(Path(llava.__file__).parent, site / "llava",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = _git_env(site)
    check = _run(["git", "apply", "--check", "-v", str(CODE_PATCH)], site, env)
    assert check.returncode == 0, check.stderr
    if shutil.which("patch"):
        dry = _run(["patch", "-p1", "--dry-run", "--fuzz=0", "-i", str(CODE_PATCH)], site)
        assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not (site / "llava" / "plugins.py").exists()  # the dry runs changed nothing
    applied = _run(["git", "apply", str(CODE_PATCH)], site, env)
    assert applied.returncode == 0, applied.stderr
    if HOST_ENTRY_POINT[0] not in {ep.name for ep in entry_points(group="llava")}:
        # basic-llava's host entry point, as pyproject.toml declares it once installed
        info = site / "basic_llava_native_test-0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: basic-llava-native-test\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text("[llava]\n%s = %s\n" % HOST_ENTRY_POINT)
    return site


def test_patch_applied_to_the_wheel_and_reverses(patched_site):
    text = (patched_site / "llava" / "train" / "train.py").read_text()
    assert "globals().update(plugins.train_classes(globals()))" in text
    assert (patched_site / "llava" / "plugins.py").is_file()
    reverse = _run(["git", "apply", "-R", "--check", str(CODE_PATCH)], patched_site, _git_env(patched_site))
    assert reverse.returncode == 0, reverse.stderr


@pytest.mark.skipif(not os.environ.get("LLAVA_DIR"), reason="LLAVA_DIR (a LLaVA git repository) not set")
def test_patches_are_git_format_patch_output_on_llava_c121f04(tmp_path):
    """``git am`` on LLaVA c121f04, then ``git format-patch --zero-commit -U2``: the committed bytes."""
    repo = tmp_path / "llava"
    repo.mkdir()
    env = dict(_git_env(repo), GIT_AUTHOR_NAME="x", GIT_AUTHOR_EMAIL="x@example.org",
               GIT_COMMITTER_NAME="x", GIT_COMMITTER_EMAIL="x@example.org")
    # the files the patches touch, as c121f04 has them (works for a checkout and a bare mirror)
    archive = subprocess.run(["git", "-C", os.environ["LLAVA_DIR"], "archive", LLAVA_COMMIT, "llava", "scripts"],
                             capture_output=True)
    assert archive.returncode == 0, archive.stderr.decode()
    subprocess.run(["tar", "x"], input=archive.stdout, cwd=repo, check=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "c121f04"],
                ["git", "apply", "--check", str(CODE_PATCH), str(SCRIPTS_PATCH)],
                ["git", "am", "-q", "--committer-date-is-author-date", str(CODE_PATCH), str(SCRIPTS_PATCH)]):
        res = _run(cmd, repo, env)
        assert res.returncode == 0, (cmd, res.stderr)
    signature = CODE_PATCH.read_text().rsplit("\n-- \n", 1)[1].strip()
    res = _run(["git", "format-patch", "-q", "--zero-commit", "-U2", "-2", "-o", str(tmp_path / "out"),
                f"--signature={signature}"], repo, env)
    assert res.returncode == 0, res.stderr
    made = sorted((tmp_path / "out").iterdir())
    assert [p.read_text() for p in made] == [CODE_PATCH.read_text(), SCRIPTS_PATCH.read_text()]


def test_llava_side_hooks_in_the_patched_package(patched_site):
    """``llava_build_vision_tower`` is asked by LLaVA's own builder; ``llava_train_classes`` is checked."""
    script = textwrap.dedent("""
        import types, pluggy, llava
        from llava import plugins
        from llava.model.multimodal_encoder.builder import build_vision_tower
        assert llava.__file__.startswith(%r), llava.__file__
        pm = plugins.get_plugin_manager()
        names = {name for name, _ in pm.list_name_plugin()}
        assert {"basic", "basic-llava"} <= names, names
        hookimpl = pluggy.HookimplMarker("llava")

        class Tower:
            @hookimpl
            def llava_build_vision_tower(self, vision_tower_cfg, kwargs):
                if vision_tower_cfg.mm_vision_tower == "my-tower":
                    return ("tower", dict(kwargs))

        class Bad:
            @hookimpl
            def llava_train_classes(self, classes):
                return {"LLaVATrainer": object}

        pm.register(Tower(), name="tower")
        assert build_vision_tower(types.SimpleNamespace(mm_vision_tower="my-tower"), delay_load=True) \\
            == ("tower", {"delay_load": True})
        try:  # the plugin declines: LLaVA's own builder answers
            build_vision_tower(types.SimpleNamespace(mm_vision_tower="no-such-tower"))
        except ValueError as exc:
            assert "Unknown vision tower" in str(exc)
        pm.register(Bad(), name="bad")  # registered last: called first
        try:
            plugins.train_classes({"LLaVATrainer": type("LLaVATrainer", (), {})})
            raise SystemExit("a class that is not a subclass was accepted")
        except TypeError as exc:
            assert "must subclass" in str(exc)
        print("hooks ok")
    """ % str(patched_site))
    env = training_env({"PYTHONPATH": f"{patched_site}{os.pathsep}{REPO_ROOT}"})
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "hooks ok" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]


def test_native_module_passes_the_hosts_validation():
    """The host's own manager loads the ``basic-llava`` entry point too: it has the spec, no opt-out needed."""
    import pluggy

    from basic_plugin.host import hookspecs, native

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(native, name=HOST_ENTRY_POINT[0])
    pm.check_pending()
    (impl,) = pm.hook.llava_train_classes.get_hookimpls()
    assert impl.plugin_name == HOST_ENTRY_POINT[0] and not impl.optionalhook
    assert "optionalhook" not in Path(native.__file__).read_text()
    hosted = type("PluginTrainingArguments", (), {"_llava_plugin_base": object})
    assert native.native_train_classes({"TrainingArguments": hosted}) == {}


def test_native_host_replaces_what_the_runtime_integration_swaps():
    """``native.HOSTED_CLASSES`` = the ``llava.train.train`` globals ``apply_plugin_host`` swaps, all in the patch."""
    from basic_plugin.host import integration, native

    applied_before = integration.plugin_host_applied()
    integration.apply_plugin_host()
    try:
        swapped = {attr for module, attr in integration._originals if module == "llava.train.train"}
        import llava.train.train as llava_train

        classes = swapped & set(native.HOSTED_CLASSES)
        assert swapped - classes == {"make_supervised_data_module"}  # a function: native.install_data_module
        originals = {name: integration._originals[("llava.train.train", name)] for name in classes}
        replaced = native.host_classes(originals)
        assert set(replaced) == classes == set(native.HOSTED_CLASSES) & set(vars(llava_train))
        for name, cls in replaced.items():
            assert issubclass(cls, originals[name]) and cls is not originals[name], name
    finally:
        if not applied_before:
            integration.remove_plugin_host()
    patch_names = re.search(r"TRAIN_CLASSES = \(([^)]*)\)", CODE_PATCH.read_text()).group(1)
    assert set(native.HOSTED_CLASSES) <= set(re.findall(r'"(\w+)"', patch_names))


def test_native_host_installs_the_data_module_only_with_the_host():
    """On a patched LLaVA the host's data module (a corrupt image named or skipped at load time) comes with the
    host's classes, and not at all when no host or plugin flag is given (off means off)."""
    from basic_plugin.host import integration, native

    applied_before = integration.plugin_host_applied()
    if applied_before:
        integration.remove_plugin_host()
    import llava.train.train as llava_train

    original = llava_train.make_supervised_data_module
    classes = {name: getattr(llava_train, name) for name in native.HOSTED_CLASSES if hasattr(llava_train, name)}
    try:
        assert native.native_train_classes(dict(classes), argv=["--output_dir", "x"]) == {}
        assert llava_train.make_supervised_data_module is original
        assert native.native_train_classes(dict(classes), argv=["--data_preflight", "off"])
        assert llava_train.make_supervised_data_module._llava_plugin_original is original
    finally:
        llava_train.make_supervised_data_module = original
        if applied_before:
            integration.apply_plugin_host()


def test_llava_side_specs_equal_the_hosts(patched_site):
    """The patched ``llava/plugins.py`` declares exactly the host's two LLaVA-side specs."""
    from basic_plugin.host import hookspecs
    from basic_plugin.host.plugins import pm as host_pm

    patched = _load(patched_site / "llava" / "plugins.py", "llava_plugins_specs_under_test")
    pm = patched.get_plugin_manager()
    declared = {name for name in vars(pm.hook) if getattr(pm.hook, name).spec is not None}
    assert declared == set(build_patch.LLAVA_HOOKS)
    for name in build_patch.LLAVA_HOOKS:
        ours, theirs = getattr(patched, name), getattr(hookspecs, name)
        assert ours.__doc__ == theirs.__doc__, name
        assert inspect.signature(ours) == inspect.signature(theirs, eval_str=True), name
        spec, host_spec = getattr(pm.hook, name).spec, getattr(host_pm.hook, name).spec
        assert spec.opts == host_spec.opts and spec.argnames == host_spec.argnames, name


@pytest.fixture
def host_plugins():
    from basic_plugin.host import plugins

    plugins.reset_plugins()
    yield plugins
    plugins.reset_plugins()


ENVIRONMENTS = [
    {},
    {"LLAVA_PLUGINS": "dinov2"},
    {"LLAVA_PLUGINS": " basic , basic-llava "},
    {"LLAVA_PLUGINS": ""},
    {"LLAVA_PLUGINS_BLOCK": "basic-llava"},
    {"LLAVA_PLUGINS": "basic,dinov2", "LLAVA_PLUGINS_BLOCK": "dinov2"},
    {"LLAVA_PLUGINS": "basic,no-such-plugin"},
    {"LLAVA_PLUGINS_BLOCK": "no-such-plugin"},
]


@pytest.mark.parametrize("variables", ENVIRONMENTS, ids=lambda v: ";".join(f"{k}={v[k]}" for k in v) or "unset")
def test_patched_manager_honours_the_plugin_variables_like_the_host(patched_site, tower_site, host_plugins,
                                                                    monkeypatch, variables):
    """``LLAVA_PLUGINS`` / ``LLAVA_PLUGINS_BLOCK``: same loaded, blocked and unknown names in both managers."""
    import warnings

    monkeypatch.syspath_prepend(str(tower_site))

    for var in ("LLAVA_PLUGINS", "LLAVA_PLUGINS_BLOCK", "LLAVA_PLUGINS_TRACE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in variables.items():
        monkeypatch.setenv(var, value)
    patched = _load(patched_site / "llava" / "plugins.py", "llava_plugins_env_under_test")
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        pm = patched.get_plugin_manager()
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        host_pm = host_plugins.load_plugins()

    def loaded(manager):
        return {name for name, plugin in manager.list_name_plugin() if plugin is not None}

    def blocked(manager):
        return {name for name in (n for n, _ in manager.list_name_plugin()) if manager.is_blocked(name)}

    env = host_plugins.plugin_environment()
    builtin = set(host_plugins.BUILTIN_PLUGINS)  # the host's own: always in its manager, LLaVA's applies the lists
    assert loaded(pm) == set(env.enabled) and loaded(host_pm) == loaded(pm) | builtin
    assert blocked(pm) - builtin == blocked(host_pm) == host_plugins.blocked_names()
    # doctor's verdict on the host's entry point is what LLaVA's manager does with it
    from basic_plugin.host import doctor

    native = doctor.check_native_plugin(env, "patched")
    assert (native.status == doctor.OK) == ("basic-llava" in loaded(pm)), (native, loaded(pm))
    unknown = sorted(n for names in env.unknown.values() for n in names)
    ours = [str(w.message) for w in ours if "unknown plugin name" in str(w.message)]
    theirs = [str(w.message) for w in theirs if "unknown plugin name" in str(w.message)]
    assert len(ours) == len(theirs) == (1 if unknown else 0)
    for name in unknown:
        assert name in ours[0] and name in theirs[0]


def test_patched_manager_traces_like_the_host(patched_site, tower_site, host_plugins, monkeypatch, capsys):
    """``LLAVA_PLUGINS_TRACE=1``: every hook call and its result on stderr, in the host's format."""
    import types

    monkeypatch.syspath_prepend(str(tower_site))

    monkeypatch.delenv("LLAVA_PLUGINS", raising=False)
    monkeypatch.delenv("LLAVA_PLUGINS_BLOCK", raising=False)
    cfg = types.SimpleNamespace(mm_vision_tower="no-such-tower")
    lines = {}
    for value in ("1", "0"):
        monkeypatch.setenv("LLAVA_PLUGINS_TRACE", value)
        patched = _load(patched_site / "llava" / "plugins.py", "llava_plugins_trace_under_test")
        capsys.readouterr()
        assert patched.build_vision_tower(cfg, delay_load=True) is None
        lines["patched", value] = capsys.readouterr().err.splitlines()
        host_plugins.reset_plugins()
        host_plugins.load_plugins().hook.llava_build_vision_tower(vision_tower_cfg=cfg, kwargs={"delay_load": True})
        lines["host", value] = capsys.readouterr().err.splitlines()
    assert lines["patched", "1"] == lines["host", "1"] == [
        "[llava-plugins] llava_build_vision_tower -> ['dinov2']",
        "[llava-plugins] llava_build_vision_tower returned None"]
    assert lines["patched", "0"] == lines["host", "0"] == []


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def start_projector(tiny_llava, tmp_path_factory):
    """A fixed projector for every run (LLaVA initialises a new one before the seed is set)."""
    import torch

    hidden = json.loads((tiny_llava["lm"] / "config.json").read_text())["hidden_size"]
    g = torch.Generator().manual_seed(0)
    state = {
        "model.mm_projector.0.weight": torch.randn(hidden, VISION_HIDDEN, generator=g) * 0.1,
        "model.mm_projector.0.bias": torch.zeros(hidden),
        "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=g) * 0.1,
        "model.mm_projector.2.bias": torch.zeros(hidden),
    }
    path = tmp_path_factory.mktemp("projector") / "mm_projector.bin"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def runs(tiny_llava, tiny_data_plain, tiny_data_v1, start_projector, patched_site, tmp_path_factory):
    """All training runs of this file, once (about 6 s each on 2 cores)."""
    root = tmp_path_factory.mktemp("patch_runs")
    nopluggy = root / "nopluggy" / "pluggy"
    nopluggy.mkdir(parents=True)
    (nopluggy / "__init__.py").write_text("raise ImportError('pluggy hidden by tests/test_patches.py')\n")
    patched = f"{patched_site}{os.pathsep}{REPO_ROOT}"

    def args(out, *extra):
        return tiny_train_args(tiny_llava, *tiny_data_plain, out, stage="pretrain", max_steps=STEPS,
                               extra=("--pretrain_mm_mlp_adapter", start_projector, *extra))

    # a newer transformers, as far as version checks can tell (the code is still 4.37.2's)
    newer = install_distribution(root / "transformers-4.40.2", "transformers", "4.40.2")

    plan = {
        "vanilla": ("tests._vanilla_train", (), None),
        # LLaVA's own entry, unpatched and patched, basic-llava installed, no plugin flag, "transformers 4.40.2"
        # (instruction tuning: the stage that writes the model and training_args.bin)
        "unpatched_newer": ("llava.train.train", (), {"PYTHONPATH": f"{newer}{os.pathsep}{REPO_ROOT}"}),
        "patched_off_newer": ("llava.train.train", (), {"PYTHONPATH": f"{newer}{os.pathsep}{patched}",
                                                         "LLAVA_PLUGINS_TRACE": "1"}),
        "runtime": ("basic_plugin.train", ("--basic", "True"), None),
        "patched": ("llava.train.train", ("--basic", "True"), {"PYTHONPATH": patched, "LLAVA_PLUGINS_TRACE": "1"}),
        "patched_off": ("llava.train.train", (), {"PYTHONPATH": patched, "LLAVA_PLUGINS_TRACE": "1"}),
        "runtime_on_patched": ("basic_plugin.train", ("--basic", "True"), {"PYTHONPATH": patched}),
        "patched_no_pluggy": ("llava.train.train", (), {"PYTHONPATH": f"{nopluggy.parent}{os.pathsep}{patched_site}",
                                                         "LLAVA_PLUGINS_TRACE": "1"}),
        "patched_no_plugins": ("llava.train.train", (), {"PYTHONPATH": patched, "LLAVA_PLUGINS": "",
                                                         "LLAVA_PLUGINS_TRACE": "1"}),
    }

    def finetune_args(out, *extra):
        return tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", max_steps=STEPS,
                               extra=("--pretrain_mm_mlp_adapter", start_projector, *extra))

    def run(name):
        module, extra, env = plan[name]
        out = root / name
        make = finetune_args if name.endswith("_newer") else args
        # one thread each, two runs at a time: same arithmetic in every run, half the wall time
        return run_training(module, make(out, *extra), output_dir=out, env={**(env or {}), "OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(plan, pool.map(run, plan)))
    results["newer_transformers"] = newer
    results["finetune_args"] = finetune_args
    return results


def _steps(run):
    return [e for e in run["log_history"] if "loss" in e]


def test_patched_llava_with_basic_trains_like_the_runtime_integration(runs):
    patched, runtime = _steps(runs["patched"]), _steps(runs["runtime"])
    assert [e["step"] for e in patched] == [e["step"] for e in runtime] == list(range(1, STEPS + 1))
    for ours, theirs in zip(patched, runtime):
        assert set(ours) == set(theirs)
        assert {"lm_loss", "basic_das", "basic_sds"} <= set(ours)
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)
        assert ours["basic_das"] > 0 and ours["basic_sds"] > 0
    # the host's hooks ran inside the patched LLaVA's own train(): BASIC returned its objective
    trace = runs["patched"]["output"]
    assert "[llava-plugins] llava_objective -> ['basic']" in trace
    assert "llava_objective returned [<basic_plugin.basic.objective.BasicObjective" in trace
    # BASIC changed training: the loss differs from vanilla LLaVA's
    assert [e["loss"] for e in patched] != runs["vanilla"]["losses"]


def test_hook_llava_train_classes(runs):
    """LLaVA's own ``train()`` asks ``llava_train_classes`` (LLaVA's manager, LLAVA_PLUGINS_TRACE=1); the host answers.

    Its classes are the ones that trained: the flag ``--basic`` parsed, and the plugin terms are logged.
    """
    trace = runs["patched"]["output"]
    assert "[llava-plugins] llava_train_classes -> ['basic-llava']" in trace
    answer = re.search(r"^\[llava-plugins\] llava_train_classes returned (\{.*)$", trace, re.M).group(1)
    # the repr is cut at 400 characters: the first entries are enough
    assert answer.startswith("{'TrainingArguments': <class 'basic_plugin.host.arguments.PluginTrainingArguments'>")
    assert "'LlavaLlamaForCausalLM': <class 'basic_plugin.host.forward.LlavaLlamaForCausalLM'>" in answer
    assert all({"basic_das", "basic_sds"} <= set(e) for e in _steps(runs["patched"]))
    # LLaVA's builder asked the tower hook too; no plugin built this tower, so LLaVA's own did
    assert "[llava-plugins] llava_build_vision_tower -> ['dinov2']" in trace
    assert "[llava-plugins] llava_build_vision_tower returned None" in trace


def test_runtime_integration_on_a_patched_llava_does_not_double_up(runs):
    steps = _steps(runs["runtime_on_patched"])
    assert len(steps) == STEPS
    for ours, theirs in zip(steps, _steps(runs["runtime"])):
        assert set(ours) == set(theirs) and ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", ["patched_off", "patched_no_pluggy", "patched_no_plugins"])
def test_patched_llava_without_basic_is_vanilla(runs, name):
    """Zero effect without plugins: no pluggy, no plugin loaded, or plugins loaded but off."""
    steps = _steps(runs[name])
    assert runs[name]["losses"] == pytest.approx(runs["vanilla"]["losses"], rel=1e-6)
    assert len(steps) == STEPS and not any(k.startswith("basic_") for e in steps for k in e)
    # who answered LLaVA's llava_train_classes (LLAVA_PLUGINS_TRACE=1 in all three runs)
    trace = [l for l in runs[name]["output"].splitlines() if l.startswith("[llava-plugins] llava_train_classes")]
    expected = {"patched_off": ["[llava-plugins] llava_train_classes -> ['basic-llava']",  # the host, via the patch
                                "[llava-plugins] llava_train_classes returned {"],
                "patched_no_plugins": ["[llava-plugins] llava_train_classes -> []",
                                       "[llava-plugins] llava_train_classes returned None"],
                "patched_no_pluggy": []}[name]  # no plugin manager at all
    assert [l[:len(e)] for l, e in zip(trace, expected)] == expected and len(trace) == len(expected), trace


def _saved_class(path: Path) -> str:
    """The class a pickled ``training_args.bin`` names (read from the pickle, nothing imported)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    strings, globals_ = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            globals_.append(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            globals_.append(arg.replace(" ", "."))
    return next(g for g in globals_ if g.endswith("TrainingArguments"))


def test_patched_llava_without_a_plugin_flag_is_llavas_own_train(runs):
    """Off means off: with basic-llava installed and no plugin flag, the patched LLaVA's own entry does what the
    unpatched one does, on a transformers the host's version policy refuses (4.40.2 as far as checks can tell):
    it trains, with the same losses and log keys, writes the same files and pickles LLaVA's own class."""
    unpatched, patched = runs["unpatched_newer"], runs["patched_off_newer"]
    assert unpatched["losses"] == patched["losses"] and len(unpatched["losses"]) == STEPS
    assert [set(e) for e in _steps(unpatched)] == [set(e) for e in _steps(patched)]
    assert not any(k.startswith(("basic_", "lm_loss", "plugin_")) for e in _steps(patched) for k in e)
    files = {name: sorted(p.name for p in Path(run["output_dir"]).iterdir()) for name, run in
             (("unpatched", unpatched), ("patched", patched))}
    assert files["unpatched"] == files["patched"] and "preflight" not in files["patched"], files
    saved = [_saved_class(Path(run["output_dir"]) / "training_args.bin") for run in (unpatched, patched)]
    # LLaVA's own class (its module is __main__ under `python -m llava.train.train`), not the host's or transformers'
    assert saved == ["__main__.TrainingArguments"] * 2, saved
    # the patched LLaVA asked, and the host kept LLaVA's classes
    trace = [l for l in patched["output"].splitlines() if l.startswith("[llava-plugins] llava_train_classes")]
    assert trace == ["[llava-plugins] llava_train_classes -> ['basic-llava']",
                     "[llava-plugins] llava_train_classes returned {}"], trace
    assert "error:" not in patched["output"]


def test_patched_llava_with_a_plugin_flag_keeps_the_version_policy(runs, patched_site, tmp_path):
    """The same "transformers 4.40.2" with --basic True: the host's policy refuses it (one line, status 2)."""
    out = tmp_path / "on"
    env = training_env({"PYTHONPATH": f"{runs['newer_transformers']}{os.pathsep}{patched_site}{os.pathsep}{REPO_ROOT}"})
    res = subprocess.run(training_command("llava.train.train", runs["finetune_args"](out, "--basic", "True")), cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith("error: transformers 4.40.2: unsupported") and not out.exists()


def test_native_host_runs_its_checks_only_when_a_plugin_is_on(monkeypatch, host_plugins):
    """The answer to a patched LLaVA: no flag -> {} and nothing run; a host flag -> the host's classes (to parse
    it), no version policy or CPU workaround; a plugin on, or BASIC_LLAVA_HOST=1 -> all of it."""
    import llava.train.train as llava_train

    from basic_plugin.host import compat, cpu, native, versions

    calls = []
    monkeypatch.setattr(versions, "require_supported_versions", lambda: calls.append("versions"))
    monkeypatch.setattr(cpu, "apply_cpu_workarounds", lambda: calls.append("cpu"))
    monkeypatch.setattr(compat, "allow_checkpoint_rng_states", lambda: calls.append("rng"))
    monkeypatch.delenv(native.HOST_ENV, raising=False)
    from basic_plugin.host.integration import _originals

    classes = {name: _originals.get(("llava.train.train", name), getattr(llava_train, name))
               for name in native.HOSTED_CLASSES if hasattr(llava_train, name)}
    base = ["--output_dir", "o", "--seed", "3", "--model_max_length", "64"]
    assert native.native_train_classes(dict(classes), argv=base) == {} and calls == []
    for flags in (["--basic", "False"], ["--basic=no"], ["--data_preflight", "full"], ["--no_basic_pretrain"]):
        replaced = native.native_train_classes(dict(classes), argv=base + flags)
        assert set(replaced) == set(classes) and calls == [], (flags, calls)
    for flags in (["--basic", "True"], ["--basic"], ["--basic=1", "--basic_depth", "2"]):
        calls.clear()
        replaced = native.native_train_classes(dict(classes), argv=base + flags)
        assert set(replaced) == set(classes) and calls == ["versions", "cpu", "rng"], (flags, calls)
    calls.clear()
    monkeypatch.setenv(native.HOST_ENV, "1")
    assert set(native.native_train_classes(dict(classes), argv=base)) == set(classes)
    assert calls == ["versions", "cpu", "rng"]


@pytest.mark.parametrize("variables", [{"LLAVA_PLUGINS_BLOCK": f"{HOST_ENTRY_POINT[0]},basic"},
                                       {"LLAVA_PLUGINS": "dinov2", "LLAVA_PLUGINS_TRACE": "1"}],
                         ids=["block", "allow"])
def test_plugins_kept_out_leave_the_patched_llava_inert(patched_site, tiny_llava, tiny_data_plain, tmp_path,
                                                        variables):
    out = tmp_path / "kept_out"
    cmd = training_command("llava.train.train", tiny_train_args(
        tiny_llava, *tiny_data_plain, out, stage="pretrain", max_steps=1, extra=("--basic", "True")))
    env = training_env({"PYTHONPATH": f"{patched_site}{os.pathsep}{REPO_ROOT}", **variables})
    for var in {"LLAVA_PLUGINS", "LLAVA_PLUGINS_BLOCK", "LLAVA_PLUGINS_TRACE"} - set(variables):
        env.pop(var, None)
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "Some specified arguments are not used by the HfArgumentParser: ['--basic', 'True']" in res.stderr
    if "LLAVA_PLUGINS_TRACE" in variables:  # LLaVA asked; only the allowed tower plugin was there to answer
        assert "[llava-plugins] llava_train_classes -> []" in res.stderr
        assert "[llava-plugins] llava_train_classes returned None" in res.stderr


def test_patched_llavas_own_entry_refuses_in_one_line(tiny_llava, tiny_data_plain, patched_site, tmp_path):
    """LLaVA's own train() cannot catch our refusals: they still end as one `error:` line, status 2."""
    import subprocess

    from tests.helpers import training_command, training_env

    out = tmp_path / "run"
    args = tiny_train_args(tiny_llava, *tiny_data_plain, out, extra=("--basic", "True", "--basic_depth", "999"))
    env = training_env({"PYTHONPATH": f"{patched_site}{os.pathsep}{REPO_ROOT}"})
    res = subprocess.run(training_command("llava.train.train", args), cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: --basic_depth 999 is out of range")
    assert not out.exists()


def install_broken_plugin(site: Path) -> Path:
    """A ``llava`` entry point whose module fails to import (a plugin built for another stack, a half-installed one)."""
    install_distribution(site, "broken-llava-plugin", entry_points={"broken": "broken_llava_plugin"})
    (site / "broken_llava_plugin.py").write_text("raise ImportError('broken_llava_plugin needs a package that is "
                                                 "not installed')\n")
    return site


def test_a_plugin_that_fails_to_import_is_left_out_by_the_patched_llava(patched_site, tiny_llava, tmp_path):
    """LLaVA's own builder (what load_pretrained_model calls) with a broken plugin installed: one warning naming
    it, the other plugins load, LLaVA builds its CLIP tower."""
    broken = install_broken_plugin(tmp_path / "broken-site")
    script = textwrap.dedent("""
        import types, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from llava import plugins
            from llava.model.multimodal_encoder.builder import build_vision_tower
            tower = build_vision_tower(types.SimpleNamespace(mm_vision_tower=%r, mm_vision_select_layer=-2),
                                       delay_load=True)
        print("tower", type(tower).__name__)
        print("loaded", sorted(n for n, p in plugins.get_plugin_manager().list_name_plugin() if p is not None))
        for w in caught:
            if "plugin" in str(w.message):
                print("warning", w.message)
    """ % str(tiny_llava["vision"]))
    env = training_env({"PYTHONPATH": os.pathsep.join([str(broken), str(patched_site), str(REPO_ROOT)])})
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "tower CLIPVisionTower" in lines
    assert "loaded ['basic', 'basic-llava', 'dinov2']" in lines
    from basic_plugin.host.plugins import load_failure_message

    expected = load_failure_message("broken", "broken_llava_plugin",
                                    ImportError("broken_llava_plugin needs a package that is not installed"))
    assert [l for l in lines if l.startswith("warning")] == [f"warning {expected}"]


def test_a_plugin_that_fails_to_import_is_left_out_by_the_host(tmp_path, host_plugins, monkeypatch, patched_site):
    """The host's manager does what the patched LLaVA's does: the same one warning, the rest loads; the run's
    unknown-flag message names it."""
    import warnings

    from basic_plugin.host.arguments import unknown_flags_message

    monkeypatch.syspath_prepend(str(install_broken_plugin(tmp_path / "broken-site")))
    for var in ("LLAVA_PLUGINS", "LLAVA_PLUGINS_BLOCK", "LLAVA_PLUGINS_TRACE"):
        monkeypatch.delenv(var, raising=False)
    patched = _load(patched_site / "llava" / "plugins.py", "llava_plugins_broken_under_test")
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        patched.get_plugin_manager()
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        pm = host_plugins.load_plugins()
    ours = [w for w in ours if "failed to load" in str(w.message)]
    theirs = [w for w in theirs if "failed to load" in str(w.message)]
    assert len(ours) == len(theirs) == 1 and str(ours[0].message) == str(theirs[0].message)
    assert ours[0].category is host_plugins.PluginLoadWarning and "'broken'" in str(ours[0].message)
    assert pm.get_plugin("basic") is not None and pm.get_plugin("broken") is None
    assert host_plugins.failed_plugins() == ["broken"]
    message = unknown_flags_message("['--broken_flag', '1']")
    assert "failed to load" in message and "broken" in message
