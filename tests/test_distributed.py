"""Expert parallelism on 2 and 4 CPU processes (gloo, started by torchrun here) equals one process on the
same batch.

One torchrun launch per world size (tests/distributed_worker.py) runs every case; the tests compare with
runs made in this process. Takes about a minute on 2 cores.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from routerlab.errors import ConfigError
from routerlab.train import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import DROPS, LAYER_CASES, ROUTERS, config, fixed_ok  # noqa: E402

TOL = 1e-5
pytestmark = [pytest.mark.xdist_group("test_distributed"), pytest.mark.slow]  # `make test` (xdist): one worker, so each torchrun launch runs once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def runs(tmp_path_factory, request):
    world = request.param
    out = tmp_path_factory.mktemp(f"ep{world}")
    # one process: 3 steps, checkpoint, the 4th step's loss (the 2-rank run resumes this checkpoint)
    one = Trainer(config(ROUTERS["softmax_topk"], out / "runs1", expert=1), log=False)
    for _ in range(3):
        one.train_step()
    one.save(out / "one.pt")
    one_next = one.train_step()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(Path(__file__).parent / "distributed_worker.py"), str(out), str(out / "one.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out / "results.pt", weights_only=True)
    results["one_next"] = one_next
    results["out"] = out
    return results


@pytest.mark.parametrize("case", [*LAYER_CASES, *(f"{c}_fixed" for c in LAYER_CASES if fixed_ok(c))])
def test_sharded_layer_equals_one_layer_on_the_whole_batch(runs, case):
    """Variable splits (host-synced sizes) and, suffix _fixed, static splits (every token to every rank)."""
    errors = runs["layer"][case]
    assert set(errors) >= {"out", "grad_x", "load"} and any(k.startswith("experts.") for k in errors)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("case", [c for c in DROPS if c != "learned_capacity"])
def test_drop_options_under_expert_parallelism_change_what_is_kept(runs, case):
    """The drop-option cases above would pass with the default policy too if it kept the same slots: it does not."""
    kept = runs["kept"][case]
    _, policy, min_capacity = DROPS[case]
    assert kept[f"{policy}/{min_capacity}"] != kept["position/1"]


@pytest.mark.parametrize("router", ["softmax_topk", "hash", "bias_balanced"])
def test_ranks_equal_one_process(runs, router, tmp_path):
    got = runs["trainer"][router]
    one = Trainer(config(ROUTERS[router], tmp_path, expert=1), log=False)
    batch = one.task.batch("train", 8, torch.Generator().manual_seed(99))
    loss, logits = one.task_loss(batch)
    aux = one.model.aux_losses()
    total = loss + sum(aux.values()) if aux else loss
    total.backward()
    assert (got["logits"] - logits.detach()).abs().max() < TOL
    assert abs(got["total"] - float(total.detach())) < TOL
    for name, p in one.model.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        assert got["grads"][name].shape == want.shape, name
        assert (got["grads"][name] - want).abs().max() < TOL, name
    one.optimizer.zero_grad(set_to_none=True)
    losses = [one.train_step() for _ in range(3)]
    assert got["losses"] == pytest.approx(losses, abs=TOL)
    for name, b in one.model.named_buffers():  # bias_balanced: the bias moved identically (global loads)
        if b.is_floating_point():
            assert (got["buffers"][name] - b).abs().max() < TOL, name
    if router == "bias_balanced":
        assert any(b.abs().max() > 0 for n, b in one.model.named_buffers() if n.endswith("bias"))


def test_global_balance_sums_counts_over_ranks(runs):
    """Each rank alone is all on one expert (micro-batch loss 2p, p = sigmoid(2)); over the ranks the load is
    even, so the global-batch loss is 1 on every rank (issue 17, Qiu et al. 2025)."""
    p = 1 / (1 + math.exp(-2.0))
    for local, global_ in runs["balance"]:
        assert local == pytest.approx(2 * p, abs=1e-6)
        assert global_ == pytest.approx(1.0, abs=1e-6)


def test_checkpoint_of_several_ranks_resumes_in_one_process(runs, tmp_path):
    got = runs["trainer"]["softmax_topk"]
    resumed = Trainer(config(ROUTERS["softmax_topk"], tmp_path, expert=1), log=False, resume=runs["out"] / "ep2.pt")
    assert resumed.step == 3
    assert resumed.train_step() == pytest.approx(got["next_loss"], abs=TOL)


def test_checkpoint_of_one_process_resumes_on_several_ranks(runs):
    assert runs["resumed_from_one_process"] == pytest.approx(runs["one_next"], abs=TOL)


def test_expert_parallel_without_torchrun_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        Trainer(config(ROUTERS["hash"], tmp_path, expert=2), log=False)


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "loop"), (torch.bfloat16, "grouped")])
def test_receiver_on_real_pairs_only_equals_the_padded_plan(dtype, backend):
    """first_rows (the receiver's and sender's plan cut to kept rows + 1 spare) gives the same output and
    gradients as the full T*k-row plan, while permute and the experts see only n_kept + 1 rows."""
    from routerlab.moe import ExpertBank
    from routerlab.moe.layer import combine, moe_compute, permute, plan_dispatch
    from routerlab.moe.parallel import first_rows

    torch.manual_seed(0)
    R, d, E, k = 200, 16, 8, 4
    bank = ExpertBank(E, d, 24).to(dtype)
    ids = torch.randint(-1, E, (R, k))
    ids[:, 0] = ids[:, 0].clamp(min=0)  # every received row has at least one local slot
    ids[-1] = -1  # ... except one, to test a row with none
    weights, x, g = torch.rand(R, k), torch.randn(R, d, dtype=dtype), torch.randn(R, d)
    results = []
    for compact in (False, True):
        bank.zero_grad()
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        if compact:
            n = int((ids >= 0).sum())
            plan = first_rows(plan_dispatch(ids, E, None), n)
            rows = permute(xx, plan)
            assert rows.shape[0] == n + 1 < R * k
            out = combine(bank(rows, plan.counts, backend), ww, plan)
        else:
            out, _ = moe_compute(xx, ids, ww, bank, None, backend)
        (out.float() * g).sum().backward()
        results.append([out.detach(), xx.grad, ww.grad, bank.w_in.grad, bank.w_out.grad])
    for full, cut in zip(*results):
        assert torch.equal(full, cut)
