"""``basic-llava``'s conventions: each subcommand's help names it, in plain text, with nothing printed before it;
``--version``; every option has help; a missing optional package or path is one line with the fix."""
import argparse
import importlib
import subprocess
import sys
import tomllib

import pytest

from basic_plugin import cli
from tests.helpers import REPO_ROOT, training_env

SUBCOMMANDS = ["doctor", "train", *cli.JOBS]


def _cli(*args, prelude=""):
    code = f"import sys\n{prelude}\nfrom basic_plugin.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=training_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_names_it_in_plain_text_and_nothing_comes_first(command):
    res = _cli(command, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: basic-llava {command} "), res.stdout[:300]
    assert res.stderr == "", res.stderr[-2000:]  # no warning of an imported library before (or after) the help
    for markup in ("``", ":mod:", ":func:", ":class:"):
        assert markup not in res.stdout, (command, markup)


def test_top_level_help_and_version():
    res = _cli("--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: basic-llava ") and "``" not in res.stdout
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    res = _cli("--version")
    assert res.returncode == 0 and res.stdout == f"basic-llava {version}\n"


class _Parsed(Exception):
    """Raised in place of parsing: the parser a command built is all this test wants."""


def _parser_of(command, monkeypatch):
    """The ArgumentParser ``basic-llava <command>`` builds, caught where it would parse."""
    caught = {}

    def grab(self, *args, **kwargs):
        caught["parser"] = self
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", grab)
    with pytest.raises(_Parsed):
        if command == "basic-llava":
            cli.main([])
        elif command == "doctor":
            cli.main(["doctor"])
        else:
            importlib.import_module(cli.JOBS[command][0]).main([])
    return caught["parser"]


@pytest.mark.parametrize("command", ["basic-llava", "doctor", *(j for j in cli.JOBS if j != "preflight")])
def test_every_option_has_help(command, monkeypatch):
    parser = _parser_of(command, monkeypatch)
    actions = [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        actions += [a for p in sub.choices.values() for a in p._actions]
    missing = [a.option_strings or a.dest for a in actions if not a.help]
    assert not missing, missing


def test_every_host_and_plugin_flag_has_help():
    """``basic-llava train`` / ``preflight`` parse LLaVA's flags (LLaVA's own help) plus these, which are ours."""
    import dataclasses

    from basic_plugin.host.arguments import HostArguments, plugin_argument_classes
    from basic_plugin.host.plugins import load_plugins

    load_plugins()
    missing = [f.name for cls in (HostArguments, *plugin_argument_classes()) for f in dataclasses.fields(cls)
               if not f.metadata.get("help")]
    assert not missing, missing


def test_a_missing_optional_package_is_one_line_with_the_fix(tmp_path):
    res = _cli("lens", "--model-path", str(tmp_path), "--images", str(tmp_path),
               prelude="sys.modules['matplotlib'] = None  # not installed, as far as Python can tell")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.splitlines() == [
        "error: basic-llava lens needs matplotlib, which is not installed; allowed: pip install matplotlib "
        "(or every package the lab's commands use: pip install \"basic-llava[lab]\")"]


def test_an_optional_package_missing_midway_is_one_line_and_others_are_not_hidden():
    from basic_plugin.host.usage import missing_dependency

    refusal = missing_dependency("assets", ModuleNotFoundError("No module named 'onnx.helper'", name="onnx.helper"))
    assert str(refusal).startswith("basic-llava assets needs onnx, which is not installed; allowed: pip install onnx")
    assert missing_dependency("assets", ModuleNotFoundError("No module named 'torch'", name="torch")) is None


@pytest.mark.parametrize("flag", ["--model-path", "--images"])
def test_a_missing_path_is_one_line_naming_the_flag(tmp_path, flag):
    paths = {"--model-path": str(tmp_path), "--images": str(tmp_path)}
    paths[flag] = str(tmp_path / "nope")
    res = _cli("lens", "--model-path", paths["--model-path"], "--images", paths["--images"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"error: {flag} {tmp_path / 'nope'}: no such file or folder; allowed: ")


def test_the_lab_extra_holds_every_optional_package_the_refusal_names():
    from basic_plugin.host.usage import OPTIONAL_PACKAGES

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["lab"]) == sorted(OPTIONAL_PACKAGES.values())
