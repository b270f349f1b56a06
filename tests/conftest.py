"""Shared fixtures: a tiny random LLaVA built offline, and tiny datasets for it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `basic_plugin` and `tests.*` importable without install
    sys.path.insert(0, str(REPO_ROOT))

from tests.helpers import OFFLINE_ENV  # noqa: E402

# Also at import time: huggingface_hub reads these when it is first imported, which can be
# during collection, before any fixture runs.
os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session", autouse=True)
def hf_offline():
    """Keep the Hugging Face libraries offline for the whole session (nothing downloads)."""
    mp = pytest.MonkeyPatch()
    for key, value in OFFLINE_ENV.items():
        mp.setenv(key, value)
    yield dict(OFFLINE_ENV)
    mp.undo()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Paths of a tiny random LLaVA: ``{"root", "lm", "vision", "tokenizer_model"}`` (~4 s)."""
    from basic_plugin.lab.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="session")
def tiny_data_plain(tmp_path_factory):
    """``(json_path, image_folder)``: 16 pretraining records (plain template)."""
    from basic_plugin.lab.tiny import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("data_plain"), n=16, template="plain",
                              seed=0)


@pytest.fixture(scope="session")
def tiny_data_v1(tmp_path_factory):
    """``(json_path, image_folder)``: 16 v1 records, 4 of them text-only, 1-3 rounds each."""
    from basic_plugin.lab.tiny import write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("data_v1"), n=16, template="v1", seed=0,
                              text_only=4)


@pytest.fixture
def toy_plugin_env(tmp_path):
    """Env for a training subprocess in which tests/toy_llava_plugin.py is an installed
    distribution with a ``llava`` entry point (``toy``), as a third-party plugin would be."""
    from tests.helpers import install_distribution

    site = install_distribution(tmp_path / "toy-site", "toy-llava-plugin", entry_points={"toy": "tests.toy_llava_plugin"})
    return {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(site)])}
