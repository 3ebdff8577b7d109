"""train.compile: the compiled model computes what the eager one does (CPU, dynamo's aot_eager backend: the
same graph capture and autograd as on the GPU, without inductor's C++ build)."""
from __future__ import annotations

import pytest
import torch

from routerlab.compile import compile_model, resolve_compile
from routerlab.config import make_config
from routerlab.train import Trainer


def config(tmp_path, router: dict, compile_mode: str = "off"):
    return make_config({
        "seed": 3,
        "task": {"name": "chars", "block_size": 16},
        "model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "num_experts": 4, "expert_hidden": 16, "moe_every": 2},
        "router": router,
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "eval_batches": 1, "compile": compile_mode},
        "run": {"dir": str(tmp_path), "checkpoint": False},
    })


def test_auto_stays_eager_until_the_trainer_is_measured_compiled():
    assert resolve_compile("auto", torch.device("cpu")) == "off"
    assert resolve_compile("auto", torch.device("cuda")) == "off"  # compile.py says why (measured 3.2x slower)
    assert resolve_compile("dense", torch.device("cpu")) == "dense"
    with pytest.raises(ValueError, match="compile must be one of"):
        resolve_compile("fast", torch.device("cpu"))


@pytest.mark.parametrize("mode", ["moe"])  # dense is a subset of moe
def test_compiled_training_equals_eager(tmp_path, mode):
    router = {"name": "bias_balanced", "k": 2, "update_rate": 0.05}  # reads the routing stats after each step
    eager = Trainer(config(tmp_path / "a", router), log=False)
    compiled = Trainer(config(tmp_path / "b", router), log=False)
    assert eager.compiled == compiled.compiled == []  # auto/off on CPU: eager
    names = compile_model(compiled.model, mode, backend="aot_eager")
    modules = dict(compiled.model.named_modules())
    assert names and all(n in modules and not isinstance(modules[n], torch.nn.ModuleList) for n in names)
    assert {"blocks.0", "blocks.1.attn", "blocks.1.ffn"} <= set(names)  # a dense block whole; in an MoE block its parts, the MoE layer whole
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # checkpoints unchanged
    for _ in range(2):
        assert compiled.train_step() == pytest.approx(eager.train_step(), rel=1e-5, abs=1e-6)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(eager.model.buffers(), compiled.model.buffers()):  # the router's bias followed the same stats
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
