"""Shared fixtures: one tiny prepared project per session, copied per test so tests never share state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

# A 2-block-per-rack, d=32 model on ~300 KB of the built-in corpus: every stage runs in seconds on 2 cores.
TINY = {
    "name": "test-tiny",
    "model": {"vocab_size": 512, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 32},
    "rack": {"stacks": 2, "blocks_per_stack": 1},
    "data": {"seq_len": 32, "val_fraction": 0.1, "max_bytes": 300_000, "sequences_per_shard": 512},
    "train": {"steps": 30, "batch_size": 8, "lr": 0.01, "warmup_steps": 1, "checkpoint_every": 10, "log_every": 5},
    "cache": {"dtype": "fp32", "batch_size": 64},
    "eval": {"max_sequences": 64, "batch_size": 32},
}


@pytest.fixture(scope="session")
def tiny_recipe_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="session")
def _prepared(tmp_path_factory, tiny_recipe_path) -> Path:
    from stackwise_cli.data.prepare import prepare
    from stackwise_cli.recipe import load_recipe
    from stackwise_cli.store.project import Project

    root = tmp_path_factory.mktemp("prepared") / "proj"
    prepare(Project(root), load_recipe(tiny_recipe_path))
    return root


@pytest.fixture
def project(_prepared, tmp_path):
    """A fresh copy of the prepared tiny project (tokenizer + shards + manifest, empty rack)."""
    from stackwise_cli.store.project import Project

    root = tmp_path / "proj"
    shutil.copytree(_prepared, root)
    return Project(root)
