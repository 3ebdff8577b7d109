import os

import pytest
import torch

# Two cores run the whole suite: one thread per test process keeps runs predictable.
torch.set_num_threads(1)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes 20 s or more (services, subprocesses); `make test` hands these out first")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`make test` runs two xdist workers with --dist loadgroup, which hands out tests in collection order:
    tests marked slow go first, so the workers end on short tests and finish together; tests marked
    xdist_group("name") run in one worker (their shared module fixture is built once).

    pytest-xdist 3.8 tells its scheduler a test's group by renaming `item._nodeid`, which pytest 9.2 no longer
    reads (pytest-dev/pytest-xdist#1386), so the groups are silently ignored. Rename the id pytest does read;
    without this, grouped tests still pass, each worker just builds their shared fixture again.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order within each part stays
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest before 9.2: xdist's own renaming works
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make any task train in about a second."""
    return [
        "model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.num_experts=4", "model.expert_hidden=16",
        "train.steps=12", "train.batch_size=16", "train.eval_every=6", "train.eval_batches=2", "train.log_every=3",
        f"run.dir={tmp_path / 'runs'}",
    ]
