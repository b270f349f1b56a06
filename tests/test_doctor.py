"""``basic-llava doctor``: GPU, flash-attn, LLaVA's hooks and plugin names, on faked machines."""
import importlib.machinery
import importlib.util
import json
import re
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from basic_plugin import cli
from basic_plugin.host import doctor, plugins

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fixed_plugins(monkeypatch):
    """Installed plugins fixed to basic, basic-llava and a toy one; no LLAVA_PLUGINS* set."""
    eps = {name: EntryPoint(name, value, plugins.ENTRY_POINT_GROUP) for name, value in
           (("basic", "basic_plugin.basic.plugin"), ("basic-llava", "basic_plugin.host.native"),
            ("toy", "tests.toy_llava_plugin"))}
    monkeypatch.setattr(plugins, "available_entry_points", lambda: dict(eps))
    for env in (plugins.ALLOW_ENV, plugins.BLOCK_ENV):
        monkeypatch.delenv(env, raising=False)
    return eps


def fake_cuda(monkeypatch, available, names=(), bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: names[i])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def fake_flash_attn(monkeypatch, installed, importable=True):
    """flash_attn located (or not) by find_spec; when located but not importable, its import fails."""
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "flash_attn":
            return importlib.machinery.ModuleSpec("flash_attn", None) if installed else None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if installed and not importable:
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    elif not installed:
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)


def by_name(checks):
    return {c.name: c for c in checks}


def run_cli(capsys, *argv):
    code = cli.main(["doctor", *argv])
    return code, capsys.readouterr().out


# -- CUDA and flash-attn -----------------------------------------------------------------------

def test_cpu_machine_is_info_not_a_problem(monkeypatch):
    fake_cuda(monkeypatch, available=False)
    fake_flash_attn(monkeypatch, installed=False)
    cuda, flash = doctor.check_cuda(), doctor.check_flash_attn()
    assert cuda.status == doctor.INFO and "no CUDA" in cuda.note and torch.__version__ in cuda.found
    assert flash.status == doctor.INFO and flash.found is None
    assert doctor.problems([cuda, flash]) == 0


def test_cuda_machine_without_flash_attn_reports_it(monkeypatch, capsys, fixed_plugins):
    fake_cuda(monkeypatch, available=True, names=("Fake GPU 80GB", "Fake GPU 80GB"), bf16=True)
    fake_flash_attn(monkeypatch, installed=False)
    cuda = doctor.check_cuda()
    assert cuda.status == doctor.OK and "Fake GPU 80GB" in cuda.found and "2" in cuda.found
    flash = doctor.check_flash_attn()
    assert flash.status == doctor.BAD and "train_mem" in flash.note and "basic_plugin.train" in flash.note
    # the whole doctor: the same finding, counted, and the exit code says so
    code, out = run_cli(capsys, "--json")
    found = by_name(doctor.Check(**c) for c in json.loads(out)["checks"])
    assert found["flash-attn"].status == doctor.BAD and found["cuda"].found == cuda.found
    assert code == 1


def test_flash_attn_that_does_not_import_is_bad_only_with_cuda(monkeypatch):
    fake_flash_attn(monkeypatch, installed=True, importable=False)
    with_cuda, without = doctor.check_flash_attn(True), doctor.check_flash_attn(False)
    assert with_cuda.status == doctor.BAD and "import" in with_cuda.note
    assert without.status == doctor.INFO and "import" in without.note


def test_flash_attn_that_imports_is_ok_with_its_version(monkeypatch):
    fake_flash_attn(monkeypatch, installed=True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(__version__="9.9.9-test"))
    check = doctor.check_flash_attn(True)
    assert check.status == doctor.OK and check.found == "9.9.9-test"


def test_gpu_without_bf16_is_info(monkeypatch):
    fake_cuda(monkeypatch, available=True, names=("Old GPU",), bf16=False)
    check = doctor.check_cuda()
    assert check.status == doctor.INFO and "Old GPU" in check.found and "--fp16" in check.note


# -- LLaVA's own plugin hooks ------------------------------------------------------------------

def _plugins_py_of_the_patch() -> str:
    """llava/plugins.py as patches/0001-plugin-hooks.patch creates it."""
    text = (REPO / "patches" / "0001-plugin-hooks.patch").read_text()
    hunk = text.split("+++ b/llava/plugins.py\n", 1)[1].split("\ndiff --git", 1)[0]
    return "\n".join(line[1:] for line in hunk.splitlines() if line.startswith("+"))


def fake_llava_package(monkeypatch, tmp_path, plugins_source=None):
    """A `llava` package located in tmp_path, with llava/plugins.py when plugins_source is given."""
    root = tmp_path / "llava"
    root.mkdir()
    if plugins_source is not None:
        (root / "plugins.py").write_text(plugins_source)
    package = types.ModuleType("llava")
    package.__spec__ = importlib.machinery.ModuleSpec("llava", None, is_package=True)
    package.__spec__.submodule_search_locations = [str(root)]
    monkeypatch.setitem(sys.modules, "llava", package)
    monkeypatch.delitem(sys.modules, "llava.plugins", raising=False)


def test_patched_llava_is_detected(monkeypatch, tmp_path):
    fake_llava_package(monkeypatch, tmp_path, _plugins_py_of_the_patch())
    assert doctor.probe_llava_hooks() == "patched"
    check = doctor.check_llava_hooks()
    assert check.status == doctor.INFO and check.note.startswith("patched") and "--basic" in check.note


def test_unpatched_llava_is_detected(monkeypatch, tmp_path):
    fake_llava_package(monkeypatch, tmp_path)
    assert doctor.probe_llava_hooks() is None
    assert doctor.check_llava_hooks().note.startswith("unpatched")
    assert "basic_plugin.train" in doctor.check_llava_hooks().note


def test_a_llava_plugins_module_without_the_hooks_is_not_taken_for_the_patch(monkeypatch, tmp_path):
    fake_llava_package(monkeypatch, tmp_path, "'''someone else's plugins module'''\n")
    assert doctor.probe_llava_hooks() == "other"


def test_an_imported_patched_module_is_detected(monkeypatch):
    module = types.ModuleType("llava.plugins")
    module.llava_train_classes = lambda classes: None
    monkeypatch.setitem(sys.modules, "llava.plugins", module)
    assert doctor.probe_llava_hooks() == "patched"


def test_patched_llava_needs_basic_llava_unblocked(monkeypatch, fixed_plugins):
    monkeypatch.setenv(plugins.BLOCK_ENV, "basic-llava")
    env = plugins.plugin_environment()
    assert doctor.check_native_plugin(env, "patched").status == doctor.BAD
    assert plugins.BLOCK_ENV in doctor.check_native_plugin(env, "patched").note
    assert doctor.check_native_plugin(env, None).status == doctor.INFO  # unpatched: not used
    monkeypatch.delenv(plugins.BLOCK_ENV)
    monkeypatch.setenv(plugins.ALLOW_ENV, "basic,basic-llava")
    assert doctor.check_native_plugin(plugins.plugin_environment(), "patched").status == doctor.OK


def test_patched_llava_needs_basic_llava_in_the_allow_list(monkeypatch, fixed_plugins):
    """A patched LLaVA's manager applies LLAVA_PLUGINS to the host's entry point too: naming only basic keeps
    the host out there, and --basic is an unknown flag (test_patches.py checks this against the real manager)."""
    monkeypatch.setenv(plugins.ALLOW_ENV, "basic")
    check = doctor.check_native_plugin(plugins.plugin_environment(), "patched")
    assert check.status == doctor.BAD and check.found == "blocked"
    assert f"add basic-llava to {plugins.ALLOW_ENV}" in check.note and "--basic is unknown" in check.note
    assert doctor.check_native_plugin(plugins.plugin_environment(), None).status == doctor.INFO  # unpatched


# -- plugin names ------------------------------------------------------------------------------

def _problems_in_text(out):
    if "\nall good" in out:
        return 0
    return int(re.search(r"^(\d+) problem\(s\) found$", out, re.M).group(1))


def test_unknown_names_and_blocked_basic_make_doctor_fail(monkeypatch, capsys, fixed_plugins):
    code, out = run_cli(capsys, "--json")
    base = json.loads(out)
    checks = by_name(doctor.Check(**c) for c in base["checks"])
    assert checks["plugins"].status == doctor.OK and checks["plugin basic"].status == doctor.OK

    monkeypatch.setenv(plugins.ALLOW_ENV, "basci")  # a typo: keeps every plugin out
    code, out = run_cli(capsys, "--json")
    bad = json.loads(out)
    checks = by_name(doctor.Check(**c) for c in bad["checks"])
    assert code == 1 and bad["problems"] == base["problems"] + 2
    assert checks["plugins"].status == doctor.BAD and "basci" in checks["plugins"].note
    assert plugins.ALLOW_ENV in checks["plugins"].note
    assert all(name in checks["plugins"].note.replace("basci", "") for name in fixed_plugins)
    assert checks["plugin basic"].status == doctor.BAD and plugins.ALLOW_ENV in checks["plugin basic"].note


def test_blocked_basic_is_a_problem_with_the_fix(monkeypatch, capsys, fixed_plugins):
    base = json.loads(run_cli(capsys, "--json")[1])["problems"]
    monkeypatch.setenv(plugins.BLOCK_ENV, "basic")
    code, out = run_cli(capsys)
    line = next(line for line in out.splitlines() if "plugin basic " in line)
    assert code == 1 and "[BAD" in line and f"from {plugins.BLOCK_ENV}" in line
    assert _problems_in_text(out) == base + 1


def test_unknown_block_name_is_a_problem(monkeypatch, fixed_plugins):
    monkeypatch.setenv(plugins.BLOCK_ENV, "basci")
    env = plugins.plugin_environment()
    assert doctor.check_plugins(env).status == doctor.BAD and "basci" in doctor.check_plugins(env).note
    assert doctor.check_basic_plugin(env).status == doctor.OK  # the typo blocks nothing that exists


def test_basic_not_installed_is_a_problem(monkeypatch):
    monkeypatch.setattr(plugins, "available_entry_points", lambda: {})
    monkeypatch.delenv(plugins.ALLOW_ENV, raising=False)
    monkeypatch.delenv(plugins.BLOCK_ENV, raising=False)
    assert doctor.check_basic_plugin().status == doctor.BAD


# -- text and --json agree ---------------------------------------------------------------------

def test_json_has_every_check_and_the_text_problem_count(monkeypatch, capsys, fixed_plugins):
    monkeypatch.setenv(plugins.ALLOW_ENV, "basic,ghost")
    text_code, text = run_cli(capsys)
    json_code, out = run_cli(capsys, "--json")
    report = json.loads(out)  # stdout is the JSON object alone
    assert json_code == text_code == 1
    assert report["problems"] == _problems_in_text(text) == text.count("[BAD") >= 1
    rows = report["checks"]
    assert {tuple(sorted(r)) for r in rows} == {("found", "name", "note", "status")}
    assert {r["status"] for r in rows} <= {"ok", "bad", "info"}
    assert sum(r["status"] == "bad" for r in rows) == report["problems"]
    printed = [line for line in text.splitlines() if line.startswith("  [")]
    assert len(printed) == len(rows)
    for line, row in zip(printed, rows):
        assert row["name"] in line and ("[BAD" in line) == (row["status"] == "bad")


def test_doctor_without_problems_exits_zero(monkeypatch, capsys, fixed_plugins):
    """Every check replaced by an ok one: the exit code follows the checks, not a constant."""
    monkeypatch.setattr(doctor, "run_checks", lambda: [doctor.Check("x", doctor.OK, "1", "ok"),
                                                       doctor.Check("y", doctor.INFO, None, "fyi")])
    code, out = run_cli(capsys)
    assert code == 0 and _problems_in_text(out) == 0
    code, out = run_cli(capsys, "--json")
    assert code == 0 and json.loads(out)["problems"] == 0


def test_every_listed_subcommand_exists_and_takes_options_directly_or_after_a_double_dash():
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT, training_env

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "basic_plugin.cli", *args], cwd=REPO_ROOT, env=training_env(),
                              capture_output=True, text=True, timeout=300)

    listed = cli("--help")
    assert listed.returncode == 0
    commands = sorted(set(listed.stdout.split("{", 1)[1].split("}", 1)[0].split(",")))
    assert {"doctor", "train", "demo", "assets", "bench", "preflight"} <= set(commands)
    for command in commands:
        direct, dashed = cli(command, "--help"), cli(command, "--", "--help")
        assert direct.returncode == 0 and dashed.returncode == 0, (command, direct.stderr[-500:], dashed.stderr[-500:])
        text = ["\n".join(ln for ln in r.stdout.splitlines() if "[WARNING]" not in ln) for r in (direct, dashed)]
        assert "usage" in text[0].lower() and text[0] == text[1], command


# -- pluggy missing, a plugin that does not import ---------------------------------------------

def test_doctor_runs_without_pluggy():
    """pluggy is one of doctor's checks: without it doctor still prints every check (no traceback) and says so."""
    import subprocess

    from tests.helpers import REPO_ROOT, training_env

    probe = ("import sys; sys.modules['pluggy'] = None  # `import pluggy` fails, find_spec finds nothing\n"
             "from basic_plugin.cli import main; sys.exit(main(['doctor']))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=training_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("  [")]
    assert any("[BAD ] plugins" in ln and "pluggy is not installed" in ln and "pip install" in ln for ln in rows), rows
    assert any(" torch " in ln for ln in rows) and any(" transformers " in ln for ln in rows)


def test_a_plugin_that_does_not_import_is_a_problem(monkeypatch, fixed_plugins):
    fixed_plugins["broken"] = EntryPoint("broken", "no_such_module_for_doctor", plugins.ENTRY_POINT_GROUP)
    check = doctor.check_plugin_imports()
    assert check.status == doctor.BAD and check.found == "1 of 4 fail"
    assert "broken (no_such_module_for_doctor): ModuleNotFoundError" in check.note
    monkeypatch.setenv(plugins.BLOCK_ENV, "broken")  # kept out: not loaded, not a problem
    assert doctor.check_plugin_imports().status == doctor.OK
