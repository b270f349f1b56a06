"""The plugin manager, argument building and the seams, without training."""
import dataclasses
import inspect

import pytest
import transformers

from basic_plugin.api import hookimpl
from basic_plugin.host import hookspecs, plugins
from basic_plugin.host.arguments import build_training_arguments
from basic_plugin.basic.arguments import BasicArguments


@pytest.fixture
def fresh_plugins(monkeypatch):
    for env in (plugins.ALLOW_ENV, plugins.BLOCK_ENV, plugins.TRACE_ENV):
        monkeypatch.delenv(env, raising=False)
    plugins.reset_plugins()
    yield plugins
    plugins.reset_plugins()
    monkeypatch.undo()
    plugins.load_plugins()


def test_basic_is_registered_through_its_entry_point(fresh_plugins):
    eps = fresh_plugins.available_entry_points()
    assert eps["basic"].value == "basic_plugin.basic.plugin"
    pm = fresh_plugins.load_plugins()
    assert pm.get_plugin("basic") is eps["basic"].load()
    assert "basic" in [i.plugin_name for i in pm.hook.llava_objective.get_hookimpls()]


def test_block_env_keeps_a_plugin_out(fresh_plugins, monkeypatch):
    monkeypatch.setenv(plugins.BLOCK_ENV, "basic")
    pm = fresh_plugins.load_plugins()
    assert pm.get_plugin("basic") is None and pm.is_blocked("basic")
    assert "basic" not in [i.plugin_name for i in pm.hook.llava_objective.get_hookimpls()]


def test_allow_list_env(fresh_plugins, monkeypatch):
    monkeypatch.setenv(plugins.ALLOW_ENV, "someone-else")
    assert fresh_plugins.load_plugins().get_plugin("basic") is None
    plugins.reset_plugins()
    monkeypatch.setenv(plugins.ALLOW_ENV, "basic,someone-else")
    assert fresh_plugins.load_plugins().get_plugin("basic") is not None


@pytest.mark.parametrize("variables", [{"LLAVA_PLUGINS": "basic"}, {"LLAVA_PLUGINS_BLOCK": "basic-llava"},
                                       {"LLAVA_PLUGINS": ""}])
def test_the_hosts_own_plugin_is_never_kept_out(fresh_plugins, monkeypatch, variables):
    """``basic-llava`` (the host's answer to a patched LLaVA) is the host's, not a plugin to pick: always loaded."""
    from basic_plugin.host import native

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    pm = fresh_plugins.load_plugins()
    assert pm.get_plugin("basic-llava") is native and not pm.is_blocked("basic-llava")
    assert "basic-llava" in [i.plugin_name for i in pm.hook.llava_train_classes.get_hookimpls()]
    assert "basic-llava" not in fresh_plugins.blocked_names()
    assert (pm.get_plugin("basic") is None) == ("basic" not in variables.get("LLAVA_PLUGINS", "basic"))


def test_trace_env_prints_hook_calls(fresh_plugins, monkeypatch, capsys):
    monkeypatch.setenv(plugins.TRACE_ENV, "1")
    pm = fresh_plugins.load_plugins()
    pm.hook.llava_plugin_arguments()
    err = capsys.readouterr().err
    assert "llava_plugin_arguments -> ['basic']" in err and "BasicArguments" in err


def test_every_hookspec_is_typed_and_documented_in_code():
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("llava_")]
    assert len(specs) >= 5
    for name in specs:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 20, name
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, name


def _llava_training_arguments():
    import llava.train.train as llava_train

    base = llava_train.TrainingArguments
    return getattr(base, "_llava_plugin_base", base)


def test_plugin_fields_become_train_flags(tmp_path):
    args_cls = build_training_arguments(_llava_training_arguments(), [BasicArguments])
    parser = transformers.HfArgumentParser((args_cls,))
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--basic", "True", "--basic_depth", "3", "--basic_kl", "reverse",
         "--report_to", "none"])
    assert args.basic is True and args.basic_depth == 3 and args.basic_kl == "reverse"
    assert args.basic_lambda_das == 1.0 and args.basic_lambda_sds == 0.01 and args.basic_vocab == "embed"
    assert isinstance(args, _llava_training_arguments())
    assert "--basic_patch_weights" in parser.format_help()
    # pickles by name, as Trainer does for training_args.bin
    import pickle

    assert pickle.loads(pickle.dumps(args)).basic_depth == 3


def test_unknown_choice_is_refused_by_the_parser(tmp_path, capsys):
    args_cls = build_training_arguments(_llava_training_arguments(), [BasicArguments])
    parser = transformers.HfArgumentParser((args_cls,))
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--basic_vocab", "nope"])
    assert "basic_vocab" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("basic_lambda_das", "-1"), ("basic_depth", "0"),
                                         ("basic_temperature", "0"), ("basic_sds_chunk_size", "0")])
def test_invalid_values_fail_while_parsing(tmp_path, flag, value):
    plugins.load_plugins()
    args_cls = build_training_arguments(_llava_training_arguments())
    parser = transformers.HfArgumentParser((args_cls,))
    with pytest.raises(ValueError, match=flag):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path / "out"), f"--{flag}", value,
                                            "--report_to", "none"])
    assert not (tmp_path / "out").exists()


def test_flag_clash_is_refused():
    @dataclasses.dataclass
    class Clashing:
        lora_r: int = 3

    with pytest.raises(ValueError, match="lora_r"):
        build_training_arguments(_llava_training_arguments(), [Clashing])


def test_apply_and_remove_the_seams_are_idempotent_and_reversible():
    import llava.model.llava_arch as arch
    import llava.train.train as llava_train

    from basic_plugin.host import integration

    integration.remove_plugin_host()
    names = ("TrainingArguments", "LlavaLlamaForCausalLM", "LLaVATrainer")
    before = {n: getattr(llava_train, n) for n in names}
    builder = arch.build_vision_tower
    integration.apply_plugin_host()
    after = {n: getattr(llava_train, n) for n in names}
    integration.apply_plugin_host()
    assert {n: getattr(llava_train, n) for n in names} == after
    for n in names:
        assert after[n] is not before[n] and issubclass(after[n], before[n])
    assert after["LlavaLlamaForCausalLM"].__name__ == "LlavaLlamaForCausalLM"  # config.json stays vanilla
    assert arch.build_vision_tower is not builder
    integration.remove_plugin_host()
    assert {n: getattr(llava_train, n) for n in names} == before and arch.build_vision_tower is builder
    assert not integration.plugin_host_applied()


class SentinelTower:
    pass


class TowerPlugin:
    @hookimpl
    def llava_build_vision_tower(self, vision_tower_cfg, kwargs):
        name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", ""))
        if name == "sentinel-tower":
            tower = SentinelTower()
            tower.kwargs = dict(kwargs)
            return tower
        return None


def test_vision_tower_hook_first_result_wins_and_falls_back_to_llava():
    import types

    import llava.model.llava_arch as arch

    from basic_plugin.host import integration

    plugins.load_plugins()
    plugins.pm.register(TowerPlugin(), name="tower-test")
    integration.apply_plugin_host()
    try:
        tower = arch.build_vision_tower(types.SimpleNamespace(mm_vision_tower="sentinel-tower"), delay_load=True)
        assert isinstance(tower, SentinelTower) and tower.kwargs == {"delay_load": True}
        with pytest.raises(ValueError, match="Unknown vision tower"):
            arch.build_vision_tower(types.SimpleNamespace(mm_vision_tower="no-such-tower"))
    finally:
        plugins.pm.unregister(name="tower-test")
        integration.remove_plugin_host()


def test_cli_hands_job_flags_through_untouched(capsys):
    from basic_plugin import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["lens", "--help"])  # "--help" reaches the job's own parser
    assert done.value.code == 0 and "--model-path" in capsys.readouterr().out
    assert cli.main(["doctor"]) in (0, 1) and "basic-llava doctor" in capsys.readouterr().out


# -- names in LLAVA_PLUGINS / LLAVA_PLUGINS_BLOCK that no installed plugin has ------------------

def _fake_entry_points(monkeypatch):
    """The installed plugins, fixed: basic and a toy one (independent of what pip installed)."""
    from importlib.metadata import EntryPoint

    eps = {"basic": EntryPoint("basic", "basic_plugin.basic.plugin", plugins.ENTRY_POINT_GROUP),
           "toy": EntryPoint("toy", "tests.toy_llava_plugin", plugins.ENTRY_POINT_GROUP)}
    monkeypatch.setattr(plugins, "available_entry_points", lambda: dict(eps))
    return eps


def _unknown_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, plugins.UnknownPluginWarning)]


def test_mistyped_allow_list_name_warns_with_the_installed_names(fresh_plugins, monkeypatch):
    eps = _fake_entry_points(monkeypatch)
    monkeypatch.setenv(plugins.ALLOW_ENV, "basci")
    with pytest.warns(plugins.UnknownPluginWarning) as record:
        pm = fresh_plugins.load_plugins()
    (message,) = _unknown_warnings(record)
    assert "basci" in message and plugins.ALLOW_ENV in message
    assert all(name in message.replace("basci", "") for name in eps)
    assert pm.get_plugin("basic") is None and pm.get_plugin("toy") is None  # what the warning is about


def test_unknown_block_name_warns_and_the_rest_still_loads(fresh_plugins, monkeypatch):
    _fake_entry_points(monkeypatch)
    monkeypatch.setenv(plugins.BLOCK_ENV, "toy, no-such-plugin")
    with pytest.warns(plugins.UnknownPluginWarning) as record:
        pm = fresh_plugins.load_plugins()
    (message,) = _unknown_warnings(record)
    assert "no-such-plugin" in message and plugins.BLOCK_ENV in message
    assert "toy" not in message.split("installed")[0]  # a known name is not called unknown
    assert pm.get_plugin("basic") is not None and pm.is_blocked("toy")


def test_known_names_do_not_warn(fresh_plugins, monkeypatch):
    import warnings

    _fake_entry_points(monkeypatch)
    monkeypatch.setenv(plugins.ALLOW_ENV, "basic,toy")
    monkeypatch.setenv(plugins.BLOCK_ENV, "toy")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pm = fresh_plugins.load_plugins()
    assert _unknown_warnings(record) == []
    assert pm.get_plugin("basic") is not None and pm.is_blocked("toy")


def test_plugin_environment_sorts_names(fresh_plugins, monkeypatch):
    eps = _fake_entry_points(monkeypatch)
    env = fresh_plugins.plugin_environment()
    assert set(env.installed) == set(eps) and env.enabled == set(eps) and not env.blocked and not env.unknown
    monkeypatch.setenv(plugins.ALLOW_ENV, "toy,ghost")
    monkeypatch.setenv(plugins.BLOCK_ENV, "toy,phantom")
    env = fresh_plugins.plugin_environment()
    assert env.blocked == {"basic", "toy"} and env.enabled == set()
    assert env.unknown == {plugins.ALLOW_ENV: ("ghost",), plugins.BLOCK_ENV: ("phantom",)}
    # the loader keeps out exactly what the environment reports as blocked
    with pytest.warns(plugins.UnknownPluginWarning):
        pm = fresh_plugins.load_plugins()
    assert {n for n in eps if pm.get_plugin(n) is None} == env.blocked


# -- refusals while parsing, and what one parse records -----------------------------------------

@pytest.mark.parametrize("exit_now", [False, True])
def test_a_refusal_while_parsing_is_raised_or_ends_the_process_as_asked(tmp_path, capsys, monkeypatch, exit_now):
    """Raised for our entry point to print; with ``exit_on_refusal`` (a patched LLaVA's own entry) one line, status 2."""
    from basic_plugin.host.refusal import TRACEBACK_ENV, Refusal

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    args_cls = build_training_arguments(_llava_training_arguments(), [BasicArguments], exit_on_refusal=exit_now)
    argv = ["--output_dir", str(tmp_path / "out"), "--basic_lambda_das", "0.1", "--report_to", "none"]
    expected = "--basic_lambda_das 0.1: set while --basic is off"
    if exit_now:
        with pytest.raises(SystemExit) as done:
            transformers.HfArgumentParser((args_cls,)).parse_args_into_dataclasses(argv)
        lines = capsys.readouterr().err.splitlines()
        assert done.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}")
    else:
        with pytest.raises(Refusal, match=expected):
            transformers.HfArgumentParser((args_cls,)).parse_args_into_dataclasses(argv)
        assert capsys.readouterr().err == ""
    assert not (tmp_path / "out").exists()


def test_what_one_installation_records_while_parsing_no_other_sees():
    """ModelArguments recorded by one installation of the host (a parse that stopped half-way) never reach
    the validation hooks of another one."""
    import llava.train.train as llava_train

    from basic_plugin.host.arguments import ParseRecord, recording

    seen = []

    class Watcher:
        @hookimpl
        def llava_validate_arguments(self, model_args, data_args, training_args):
            seen.append(model_args)

    first = ParseRecord()
    recording(llava_train.ModelArguments, "model", first)(model_name_or_path="first-run")  # no TrainingArguments
    plugins.load_plugins()
    plugins.pm.register(Watcher(), name="watcher-test")
    try:
        second = ParseRecord()
        model_cls = recording(llava_train.ModelArguments, "model", second)
        args_cls = build_training_arguments(_llava_training_arguments(), [BasicArguments], parsed=second)
        args_cls(output_dir="unused", report_to="none")
        model_args = model_cls(model_name_or_path="second-run")
        args_cls(output_dir="unused", report_to="none")
    finally:
        plugins.pm.unregister(name="watcher-test")
    assert first["model"].model_name_or_path == "first-run"
    assert seen == [None, model_args] and "model" not in second


# -- the trainer -------------------------------------------------------------------------------

def test_the_plugin_trainer_is_llavas_with_the_mixin_in_front():
    import llava.train.llava_trainer as llava_trainer

    from basic_plugin.host.trainer import PluginTrainerMixin, plugin_trainer_class

    cls = plugin_trainer_class(llava_trainer.LLaVATrainer)
    assert issubclass(cls, llava_trainer.LLaVATrainer) and cls.__mro__[1] is PluginTrainerMixin
    assert cls.__name__ == "PluginTrainer" and cls.__module__ == "basic_plugin.host.trainer"
    assert plugin_trainer_class(cls) is cls  # a hosted class is left as it is: nothing wrapped twice


def test_a_streak_counts_in_all_in_a_row_and_in_the_window():
    from basic_plugin.host.trainer import Streak

    streak = Streak()
    seen = []
    for bad in (True, True, False, True, True, True):
        streak.add(bad)
        seen.append((streak.total, streak.in_a_row, streak.in_window))
    assert seen == [(1, 1, 1), (2, 2, 2), (2, 0, 2), (3, 1, 3), (4, 2, 4), (5, 3, 5)]
