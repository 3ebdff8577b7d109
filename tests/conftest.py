import os

import pytest
import torch

# Two cores run the whole suite: one thread per test process keeps runs predictable.
torch.set_num_threads(1)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make any task train in about a second."""
    return [
        "model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.num_experts=4", "model.expert_hidden=16",
        "train.steps=12", "train.batch_size=16", "train.eval_every=6", "train.eval_batches=2", "train.log_every=3",
        f"run.dir={tmp_path / 'runs'}",
    ]
