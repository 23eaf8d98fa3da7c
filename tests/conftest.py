"""Shared fixtures: a micro model (random init, head_dim 16) built once per test session."""

from __future__ import annotations

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
