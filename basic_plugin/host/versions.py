"""Which versions of LLaVA's training stack work, and a clear message when one does not."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


@dataclass
class Finding:
    package: str
    found: str | None
    ok: bool
    note: str


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch is reported by its own finding
        return False


def _check(package, dist, rule, note_bad, required=True):
    found = installed_version(dist)
    if found is None:
        return Finding(package, None, not required, "not installed" + ("" if required else " (optional)"))
    ok = rule(Version(found))
    return Finding(package, found, ok, "ok" if ok else note_bad)


def check_versions() -> list[Finding]:
    """One finding per package of LLaVA's training path."""
    findings = [
        _check("torch", "torch", lambda v: v >= Version("2.0"), "torch >= 2.0 is needed"),
        _check("llava", "llava-torch", lambda v: v >= Version("1.2"),
               "llava >= 1.2 (LLaVA-1.5 code) is needed"),
        _check("transformers", "transformers", lambda v: Version("4.37") <= v < Version("4.38"),
               "LLaVA-1.5 trains and generates with transformers 4.37.x (4.38+ breaks generation, "
               "4.52+ breaks llava_trainer, 4.53+ cannot import llava.train)"),
        _check("tokenizers", "tokenizers", lambda v: Version("0.15") <= v < Version("0.16"),
               "tokenizers 0.15.x goes with transformers 4.37"),
        _check("peft", "peft", lambda v: v < Version("0.14"),
               "peft >= 0.14 breaks every run on transformers 4.37 (Trainer imports peft); use 0.13.2"),
        _check("accelerate", "accelerate", lambda v: (Version("0.29") <= v or _has_cuda()) and v < Version("1.0"),
               "accelerate 0.29-0.34 works with transformers 4.37 (<= 0.28 forces NCCL, which a CPU lacks; "
               "1.x breaks transformers 4.37)"),
        _check("deepspeed", "deepspeed", lambda v: v >= Version("0.12"), "deepspeed >= 0.12 is needed",
               required=False),
        _check("pluggy", "pluggy", lambda v: v >= Version("1.3"), "pluggy >= 1.3 is needed"),
        _check("sentencepiece", "sentencepiece", lambda v: True, "", required=True),
    ]
    if installed_version("llava") is not None and installed_version("llava-torch") is None:
        findings[1] = Finding("llava", installed_version("llava"), True, "ok (git checkout of LLaVA)")
    return findings


def require_supported_versions() -> None:
    """Refuse to start training on a stack that is known to fail later: one ``error:`` line per package."""
    bad = [f for f in check_versions() if not f.ok]
    if bad:
        from basic_plugin.host.refusal import Refusal

        raise Refusal("; ".join(f"{f.package} {f.found or '(missing)'}: unsupported; allowed: {f.note}" for f in bad)
                      + " (details: basic-llava doctor)")
