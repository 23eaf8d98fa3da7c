"""Shared fixtures: a micro model (random init, head_dim 16) built once per test session; a directory outside
the sandbox's workspace."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from agentrl.model import build_tiny_model


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    # the two core environments: replaying every table entry's oracle (sandboxes, browsers) would take minutes
    return build_tiny_model(tmp_path_factory.mktemp("micro") / "model", size="micro", seed=0,
                            env_names=["calculator", "lookup"])


@pytest.fixture(scope="session")
def tokenizer(micro_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_model_dir)


@pytest.fixture
def outside_dir():
    """A world-writable directory outside the workspace that the sandbox can see (its /tmp is private)."""
    path = Path(tempfile.mkdtemp(prefix="agentrl-outside-test-", dir="/run"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)
