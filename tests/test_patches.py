"""patches/: LLaVA's own plugin support trains exactly like basic-llava's runtime integration.

``0001-plugin-hooks.patch`` is applied (dry run first, then for real) to a copy of the
installed ``llava`` package in a temp folder put first on PYTHONPATH; the tiny model then
trains 3 steps through the patched LLaVA's own entry module (``python -m llava.train.train``,
CPU, no DeepSpeed) and through the runtime integration (``python -m basic_plugin.train``, on
the unpatched wheel), with the same arguments and the same starting projector:

- with ``--basic True`` both give the same per-step losses and BASIC terms;
- without it, the patched LLaVA gives vanilla LLaVA's losses (``tests._vanilla_train``), with
  basic-llava installed, and with pluggy missing altogether;
- with the plugins blocked, ``--basic`` is an unknown flag again (the patch is inert).
"""
from __future__ import annotations

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

from basic_plugin.tiny import VISION_HIDDEN, tiny_train_args
from tests.helpers import REPO_ROOT, run_training, training_command, training_env

PATCHES = REPO_ROOT / "patches"
CODE_PATCH = PATCHES / "0001-plugin-hooks.patch"
SCRIPTS_PATCH = PATCHES / "0002-scripts-basic-flag.patch"
CODE_FILES = {"llava/plugins.py", "llava/train/train.py", "llava/model/multimodal_encoder/builder.py"}
SCRIPT_FILES = {f"scripts/v1_5/{n}.sh" for n in ("pretrain", "finetune", "finetune_lora")}
HOST_ENTRY_POINT = ("basic-llava", "basic_plugin.host.native")
STEPS = 3


def _diff_stats(text: str):
    text = text[text.index("\ndiff --git "):]  # the diffs, not the commit message
    files = re.findall(r"^diff --git a/(\S+) b/", text, re.M)
    added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l for l in text.splitlines() if l.startswith("-") and not l.startswith("---")
               and l != "-- "]
    return set(files), added, removed


def test_patches_are_small_git_format_patches():
    code = CODE_PATCH.read_text()
    assert code.startswith("From ") and "\nSubject: [PATCH 1/2]" in code
    files, added, removed = _diff_stats(code)
    # llava_arch.py and model/builder.py differ between git and the wheel: not touched
    assert files == CODE_FILES
    assert len(added) <= 80 and not removed, (len(added), removed)

    scripts = SCRIPTS_PATCH.read_text()
    assert scripts.startswith("From ") and "\nSubject: [PATCH 2/2]" in scripts
    files, added, removed = _diff_stats(scripts)
    assert files == SCRIPT_FILES
    assert added == ["+    --basic True \\"] * 3 and not removed


def _git_env(tmp: Path) -> dict:
    # never let git find a repository above the temp folder
    return dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp.parent))


def _run(cmd, cwd, env=None):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def patched_site(tmp_path_factory):
    """A folder holding a patched copy of the installed ``llava`` package (site-packages layout)."""
    import llava

    site = tmp_path_factory.mktemp("patched_site")
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


@pytest.mark.skipif(not os.environ.get("LLAVA_DIR"), reason="LLAVA_DIR (a LLaVA git checkout) not set")
def test_patches_apply_to_a_llava_checkout():
    llava_dir = Path(os.environ["LLAVA_DIR"])
    res = _run(["git", "apply", "--check", str(CODE_PATCH), str(SCRIPTS_PATCH)], llava_dir)
    assert res.returncode == 0, res.stderr


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
    """The host's own manager loads the ``basic-llava`` entry point too: it must pass ``check_pending``."""
    import pluggy

    from basic_plugin.host import hookspecs, native

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(native, name=HOST_ENTRY_POINT[0])
    pm.check_pending()
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

        originals = {name: integration._originals[("llava.train.train", name)] for name in swapped}
        replaced = native.host_classes(originals)
        assert set(replaced) == swapped == set(native.HOSTED_CLASSES) & set(vars(llava_train))
        for name, cls in replaced.items():
            assert issubclass(cls, originals[name]) and cls is not originals[name], name
    finally:
        if not applied_before:
            integration.remove_plugin_host()
    patch_names = re.search(r"TRAIN_CLASSES = \(([^)]*)\)", CODE_PATCH.read_text()).group(1)
    assert set(native.HOSTED_CLASSES) <= set(re.findall(r'"(\w+)"', patch_names))


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
def runs(tiny_llava, tiny_data_plain, start_projector, patched_site, tmp_path_factory):
    """All training runs of this file, once (about 6 s each on 2 cores)."""
    root = tmp_path_factory.mktemp("patch_runs")
    nopluggy = root / "nopluggy" / "pluggy"
    nopluggy.mkdir(parents=True)
    (nopluggy / "__init__.py").write_text("raise ImportError('pluggy hidden by tests/test_patches.py')\n")
    patched = f"{patched_site}{os.pathsep}{REPO_ROOT}"

    def args(out, *extra):
        return tiny_train_args(tiny_llava, *tiny_data_plain, out, stage="pretrain", max_steps=STEPS,
                               extra=("--pretrain_mm_mlp_adapter", start_projector, *extra))

    plan = {
        "vanilla": ("tests._vanilla_train", (), None),
        "runtime": ("basic_plugin.train", ("--basic", "True"), None),
        "patched": ("llava.train.train", ("--basic", "True"), {"PYTHONPATH": patched, "LLAVA_PLUGINS_TRACE": "1"}),
        "patched_off": ("llava.train.train", (), {"PYTHONPATH": patched}),
        "runtime_on_patched": ("basic_plugin.train", ("--basic", "True"), {"PYTHONPATH": patched}),
        "patched_no_pluggy": ("llava.train.train", (),
                              {"PYTHONPATH": f"{nopluggy.parent}{os.pathsep}{patched_site}"}),
    }

    def run(name):
        module, extra, env = plan[name]
        out = root / name
        # one thread each, two runs at a time: same arithmetic in every run, half the wall time
        return run_training(module, args(out, *extra), output_dir=out, env={**(env or {}), "OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(plan, pool.map(run, plan)))


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
    # the host's hooks ran inside the patched LLaVA's own train(): BASIC asked for hidden states
    trace = runs["patched"]["output"]
    for hook in ("llava_model_ready", "llava_wants_hidden_states", "llava_auxiliary_losses", "llava_log_metrics"):
        assert f"[llava-plugins] {hook} -> ['basic']" in trace, hook
    # BASIC changed training: the loss differs from vanilla LLaVA's
    assert [e["loss"] for e in patched] != runs["vanilla"]["losses"]


def test_runtime_integration_on_a_patched_llava_does_not_double_up(runs):
    steps = _steps(runs["runtime_on_patched"])
    assert len(steps) == STEPS
    for ours, theirs in zip(steps, _steps(runs["runtime"])):
        assert set(ours) == set(theirs) and ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", ["patched_off", "patched_no_pluggy"])
def test_patched_llava_without_basic_is_vanilla(runs, name):
    steps = _steps(runs[name])
    assert runs[name]["losses"] == pytest.approx(runs["vanilla"]["losses"], rel=1e-6)
    assert len(steps) == STEPS and not any(k.startswith("basic_") for e in steps for k in e)
    # the host is loaded through the patch (it logs lm_loss) unless pluggy is missing
    assert all(("lm_loss" in e) == (name == "patched_off") for e in steps)


def test_blocked_plugins_leave_the_patched_llava_inert(patched_site, tiny_llava, tiny_data_plain, tmp_path):
    out = tmp_path / "blocked"
    cmd = training_command("llava.train.train", tiny_train_args(
        tiny_llava, *tiny_data_plain, out, stage="pretrain", max_steps=1, extra=("--basic", "True")))
    env = training_env({"PYTHONPATH": f"{patched_site}{os.pathsep}{REPO_ROOT}",
                        "LLAVA_PLUGINS_BLOCK": f"{HOST_ENTRY_POINT[0]},basic"})
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "Some specified arguments are not used by the HfArgumentParser: ['--basic', 'True']" in res.stderr
