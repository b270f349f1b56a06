"""``basic-llava doctor``: what the machine offers LLaVA training with plugins, and what to change.

One function per check, each returning :class:`Check` (or a list of them for the package
versions, which come from :mod:`basic_plugin.host.versions`). A check is

- ``ok``: nothing to do;
- ``bad``: training (or ``--basic``) will not work as set up; ``note`` says what to change;
- ``info``: worth knowing, not a problem (e.g. no CUDA on a CPU machine).

:func:`run_checks` runs them all; ``problems`` counts the ``bad`` ones. The probes that look at
the machine (:func:`probe_cuda`, :func:`probe_flash_attn`, :func:`probe_llava_hooks`) are
separate functions so that a test can stand in for a GPU or a patched LLaVA.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from basic_plugin.host.versions import installed_version

OK, BAD, INFO = "ok", "bad", "info"

#: the plugin ``--basic`` belongs to, and the one a patched LLaVA calls to take plugin flags
BASIC_PLUGIN = "basic"
NATIVE_PLUGIN = "basic-llava"


@dataclass
class Check:
    name: str
    status: str  #: "ok" | "bad" | "info"
    found: str | None
    note: str  #: for bad/info: one line saying what it means or what to change

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CudaInfo:
    torch_version: str | None  #: None: torch does not import
    available: bool = False
    count: int = 0
    names: tuple[str, ...] = ()
    bf16: bool = False
    error: str | None = None  #: why torch did not import


# -- probes ------------------------------------------------------------------------------------

def probe_cuda() -> CudaInfo:
    """torch's version and what it sees of CUDA."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return CudaInfo(None, error=f"{type(exc).__name__}: {exc}")
    info = CudaInfo(getattr(torch, "__version__", "?"))
    try:
        info.available = bool(torch.cuda.is_available())
        if info.available:
            info.count = int(torch.cuda.device_count())
            info.names = tuple(torch.cuda.get_device_name(i) for i in range(info.count))
            info.bf16 = bool(torch.cuda.is_bf16_supported())
    except Exception as exc:  # noqa: BLE001 - a broken driver is reported, not raised
        info.error = f"{type(exc).__name__}: {exc}"
    return info


def probe_flash_attn() -> tuple[bool, str | None, str | None]:
    """(installed, version, import error) of flash-attn."""
    if importlib.util.find_spec("flash_attn") is None:
        return False, None, None
    try:
        import flash_attn
    except Exception as exc:  # noqa: BLE001 - e.g. built against another torch/CUDA
        return True, installed_version("flash-attn"), f"{type(exc).__name__}: {exc}"
    return True, getattr(flash_attn, "__version__", None) or installed_version("flash-attn"), None


def probe_llava_hooks() -> str | None:
    """Whether the installed ``llava`` carries the plugin hooks of ``patches/0001-plugin-hooks.patch``.

    Returns ``"patched"`` (a module ``llava.plugins`` with the hook ``llava_train_classes``),
    ``"other"`` (a ``llava.plugins`` without it), ``"no-llava"``, or None (unpatched). LLaVA
    is not imported for this: its package is located and ``plugins.py`` looked for in it.
    """
    module = sys.modules.get("llava.plugins")
    if module is not None:  # already imported (llava.train.train of a patched LLaVA imports it)
        return "patched" if hasattr(module, "llava_train_classes") else "other"
    try:
        spec = importlib.util.find_spec("llava")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "no-llava"
    for location in spec.submodule_search_locations or ():
        path = Path(location, "plugins.py")
        if path.is_file():
            return "patched" if "llava_train_classes" in path.read_text(errors="replace") else "other"
    return None


# -- checks ------------------------------------------------------------------------------------

def check_cuda(cuda: CudaInfo | None = None) -> Check:
    """torch imports; CUDA devices, their count and bf16 support (no CUDA is info, not a problem)."""
    cuda = cuda or probe_cuda()
    if cuda.torch_version is None:
        return Check("cuda", BAD, None, f"torch does not import ({cuda.error}); install torch >= 2.0")
    if not cuda.available:
        note = "no CUDA (CPU training only)" + (f"; torch.cuda said {cuda.error}" if cuda.error else "")
        return Check("cuda", INFO, f"torch {cuda.torch_version}", note)
    names = ", ".join(sorted(set(cuda.names))) or "?"
    found = f"{cuda.count} x {names}; bf16 {'yes' if cuda.bf16 else 'no'}"
    if not cuda.bf16:
        return Check("cuda", INFO, found, "no bf16 on this GPU: train with --bf16 False --fp16 True "
                                          "(LLaVA's scripts pass --bf16 True)")
    return Check("cuda", OK, found, "ok")


def check_flash_attn(cuda_available: bool | None = None) -> Check:
    """flash-attn, needed by ``llava.train.train_mem`` only; missing is a problem only with CUDA."""
    if cuda_available is None:
        cuda_available = probe_cuda().available
    installed, found, error = probe_flash_attn()
    bad_or_info = BAD if cuda_available else INFO
    if not installed:
        note = ("not installed: llava.train.train_mem (flash attention) needs it; "
                "`pip install flash-attn --no-build-isolation`, or train with python -m basic_plugin.train "
                "(default attention)" if cuda_available else
                "not installed (needed only by llava.train.train_mem on CUDA; CPU uses python -m "
                "basic_plugin.train)")
        return Check("flash-attn", bad_or_info, None, note)
    if error:
        return Check("flash-attn", bad_or_info, found,
                     f"installed but does not import ({error}); rebuild it against this torch/CUDA")
    return Check("flash-attn", OK, found, "ok")


def check_versions() -> list[Check]:
    """LLaVA's training stack against :func:`basic_plugin.host.versions.check_versions` (the one rule set)."""
    from basic_plugin.host.versions import check_versions as findings

    checks = []
    for f in findings():
        if f.ok and f.found is None:  # an optional package that is absent
            checks.append(Check(f.package, INFO, None, f.note))
        else:
            checks.append(Check(f.package, OK if f.ok else BAD, f.found, f.note))  # ok: "ok", or which kind
    return checks


def check_llava_imports() -> Check:
    """LLaVA's training module imports (``llava/model/__init__.py`` swallows errors: import it directly)."""
    try:
        import llava.model.language_model.llava_llama  # noqa: F401
        import llava.train.train  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the point is to show any failure
        return Check("llava.train", BAD, None, f"importing LLaVA's training code failed: "
                                                f"{type(exc).__name__}: {exc}")
    return Check("llava.train", OK, "imports", "ok")


def check_llava_hooks(state: str | None = "probe") -> Check:
    """Whether LLaVA's own entries (``llava/train/train*.py``) take plugin flags."""
    state = probe_llava_hooks() if state == "probe" else state
    if state == "patched":
        return Check("llava hooks", INFO, "patched", "patched (LLaVA's own entry takes --basic)")
    if state == "other":
        return Check("llava hooks", INFO, "llava.plugins without llava_train_classes",
                     "unpatched (use python -m basic_plugin.train); llava.plugins is not patches/0001's")
    if state == "no-llava":
        return Check("llava hooks", INFO, None, "llava not installed")
    return Check("llava hooks", INFO, "unpatched", "unpatched (use python -m basic_plugin.train)")


def check_plugins(env=None) -> Check:
    """The installed plugins and the names in ``LLAVA_PLUGINS*`` that none of them has."""
    from basic_plugin.host.plugins import ALLOW_ENV, BLOCK_ENV, plugin_environment

    env = env or plugin_environment()
    parts = [f"{n} ({'blocked' if n in env.blocked else 'enabled'})" for n in sorted(env.installed)]
    found = ", ".join(parts) or "none installed"
    if env.unknown:
        fixes = []
        if ALLOW_ENV in env.unknown:
            fixes.append(f"fix or remove {','.join(env.unknown[ALLOW_ENV])} in {ALLOW_ENV} "
                         f"(or unset it to load every plugin)")
        if BLOCK_ENV in env.unknown:
            fixes.append(f"fix or remove {','.join(env.unknown[BLOCK_ENV])} in {BLOCK_ENV}")
        return Check("plugins", BAD, found, "unknown plugin name(s): " + "; ".join(fixes)
                     + f"; installed: {', '.join(sorted(env.installed)) or '(none)'}")
    return Check("plugins", OK, found, "ok")


def check_plugin_imports(env=None) -> Check:
    """Every enabled plugin imports (one that does not is left out by both managers, with a warning)."""
    from basic_plugin.host.plugins import available_entry_points, plugin_environment

    env = env or plugin_environment()
    broken = []
    for name, ep in sorted(available_entry_points().items()):
        if name not in env.enabled:
            continue
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            broken.append(f"{name} ({ep.value}): {type(exc).__name__}: {exc}")
    if broken:
        return Check("plugin imports", BAD, f"{len(broken)} of {len(env.enabled)} fail",
                     "left out of training and model loading, their flags unknown: " + "; ".join(broken)
                     + "; fix or reinstall them, or keep them out with LLAVA_PLUGINS_BLOCK")
    return Check("plugin imports", OK, f"{len(env.enabled)} import", "ok")


def _unblocking(name: str, env) -> str:
    """What to change so that the variables no longer keep entry point ``name`` out."""
    from basic_plugin.host.plugins import ALLOW_ENV, BLOCK_ENV

    fixes = []
    if name in env.block:
        fixes.append(f"remove {name} from {BLOCK_ENV}")
    if env.allow is not None and name not in env.allow:
        fixes.append(f"add {name} to {ALLOW_ENV} (or unset it)")
    return " and ".join(fixes)


def check_basic_plugin(env=None) -> Check:
    """``--basic`` needs the ``basic`` entry point installed and not blocked."""
    from basic_plugin.host.plugins import plugin_environment

    env = env or plugin_environment()
    name = BASIC_PLUGIN
    if name not in env.installed:
        return Check(f"plugin {name}", BAD, None, "not installed: `pip install -e .` in this repository "
                                                  "registers it (--basic is unknown without it)")
    if name in env.blocked:
        return Check(f"plugin {name}", BAD, "blocked", "--basic is unknown while it is blocked: "
                                                         + _unblocking(name, env))
    return Check(f"plugin {name}", OK, env.installed[name], "ok")


def check_native_plugin(env=None, hooks: str | None = "probe") -> Check:
    """A patched LLaVA takes ``--basic`` through the ``basic-llava`` entry point; its own plugin manager
    applies ``LLAVA_PLUGINS`` and ``LLAVA_PLUGINS_BLOCK`` to it like to any other entry point."""
    from basic_plugin.host.plugins import plugin_environment

    env = env or plugin_environment()
    hooks = probe_llava_hooks() if hooks == "probe" else hooks
    name = NATIVE_PLUGIN
    status = BAD if hooks == "patched" else INFO
    if name not in env.installed:
        return Check(f"plugin {name}", status, None, "not installed: `pip install -e .` in this repository; "
                                                     "a patched LLaVA's own entry needs it for --basic")
    if name in env.blocked:
        return Check(f"plugin {name}", status, "blocked", f"{_unblocking(name, env)}: a patched LLaVA's own entry "
                                                          "ignores plugin flags (--basic is unknown) while it is blocked")
    return Check(f"plugin {name}", OK, env.installed[name], "ok")


def run_checks() -> list[Check]:
    """Every check, in the order ``basic-llava doctor`` prints them (without pluggy too: it is one of them)."""
    cuda = probe_cuda()
    hooks = probe_llava_hooks()
    checks = [check_cuda(cuda), check_flash_attn(cuda.available), *check_versions(), check_llava_imports(),
              check_llava_hooks(hooks)]
    if importlib.util.find_spec("pluggy") is None:
        checks.append(Check("plugins", BAD, None, "not listed: pluggy is not installed (pip install 'pluggy>=1.3')"))
        return checks
    try:
        from basic_plugin.host.plugins import plugin_environment

        env = plugin_environment()
        checks += [check_plugins(env), check_plugin_imports(env), check_basic_plugin(env),
                   check_native_plugin(env, hooks)]
    except Exception as exc:  # noqa: BLE001 - a broken entry point (or pluggy) is a finding
        checks.append(Check("plugins", BAD, None, f"listing plugins failed: {type(exc).__name__}: {exc}"))
    return checks


def problems(checks: list[Check]) -> int:
    return sum(c.status == BAD for c in checks)


def report(checks: list[Check]) -> dict:
    """The ``--json`` object: every check and the number of problems."""
    return {"checks": [c.as_dict() for c in checks], "problems": problems(checks)}
