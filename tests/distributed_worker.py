"""Run by tests/test_distributed.py under torchrun (2 processes, gloo on CPU). Rank 0 writes results.pt.

    python -m torch.distributed.run --nproc-per-node 2 ... tests/distributed_worker.py OUT_DIR ONE_PROCESS_CKPT
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from routerlab.config import make_config
from routerlab.moe import ExpertBank, MoELayer
from routerlab.moe.parallel import EXCHANGE_DISPATCHERS, all_gather_rows, shard_experts
from routerlab.routers import Router, Routing
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams
from routerlab.train import Trainer

ROUTERS = {
    "softmax_topk": {"name": "softmax_topk", "k": 2, "z_loss": 0.01},
    "hash": {"name": "hash"},
    "bias_balanced": {"name": "bias_balanced", "k": 2, "update_rate": 0.05},
}


def config(router: dict, run_dir: Path, expert: int):
    return make_config({
        "seed": 0,
        "task": {"name": "chars", "block_size": 16},
        "model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "num_experts": 4, "expert_hidden": 16},
        "router": router,
        "train": {"steps": 10, "batch_size": 8, "lr": 1e-2, "eval_batches": 1},
        "run": {"dir": str(run_dir), "checkpoint": False},
        "parallel": {"expert": expert},
    })


class TableRouter(Router):
    """Experts fixed by token id (a table row per id), weights from a learned softmax: edge cases on demand."""

    def __init__(self, d_model: int, table: torch.Tensor) -> None:
        super().__init__(d_model, 4, None)
        self.table = table
        self.gate = torch.nn.Linear(d_model, 4, bias=False)

    def forward(self, x, *, token_ids=None) -> Routing:
        logits = self.gate(x)
        experts = self.table[token_ids]
        weights = torch.where(experts >= 0, logits.softmax(-1).gather(1, experts.clamp_min(0)), 0)
        return Routing(experts, weights, logits)


LAYER_CASES = ("learned", "learned_capacity", "zero_token_rank", "empty_expert", "all_to_one", "all_to_one_capacity", "learned_one_chunk",
               "learned_three_chunks", "learned_probability", "learned_min_capacity", "zero_token_rank_probability")
CHUNKS = {"learned_one_chunk": 1, "learned_three_chunks": 3}  # token chunks per layer: 2 in the other layer cases (the layer's default, used by the trainer cases, is 1); every case also with exchange="fixed" (but the zero-token rank)
# the drop options (issue 17): capacity factor, drop_policy, min_capacity of the layer
DROPS = {"learned_capacity": (1.0, "position", 1), "learned_probability": (1.0, "probability", 1),
         "learned_min_capacity": (0.25, "position", 5), "zero_token_rank_probability": (0.75, "probability", 1)}
KEPT: dict[str, dict[str, list]] = {}  # case -> slots the one-process layer kept, per policy (the test checks they differ)


def fixed_ok(name: str) -> bool:
    return not name.startswith("zero_token_rank")  # fixed splits need the same token count on every rank


def layer_case(name: str, rank: int, world: int, exchange: str = "variable") -> dict[str, float]:
    """One MoE layer, sharded, against the same layer unsharded on the concatenated batch."""
    torch.manual_seed(7)
    d, T = 8, 12
    x = torch.randn(T, d)
    ids = torch.randint(0, 4, (T,))
    capacity = None
    sizes = [T // world] * world
    policy, min_capacity = "position", 1
    if name.startswith("learned"):
        router = SoftmaxTopK(d, 4, SoftmaxTopKParams(k=2))
        capacity, policy, min_capacity = DROPS.get(name, (None, "position", 1))
    else:
        table = {
            "zero_token_rank": torch.tensor([[0, 2], [1, 3], [2, -1], [3, 0]]),
            "zero_token_rank_probability": torch.tensor([[0, 2], [1, 3], [2, -1], [3, 0]]),
            "empty_expert": torch.tensor([[0, 1], [1, 0], [2, 0], [0, -1]]),  # expert 3 never chosen
            "all_to_one": torch.tensor([[0], [0], [0], [0]]),  # the other rank's experts get nothing
            "all_to_one_capacity": torch.tensor([[0], [0], [0], [0]]),
        }[name]
        router = TableRouter(d, table)
        capacity = 1.0 if name.endswith("capacity") else None
        capacity, policy, min_capacity = DROPS.get(name, (capacity, "position", 1))
        if name.startswith("zero_token_rank"):
            sizes = [0, T] + [0] * (world - 2)
    full = MoELayer(router, ExpertBank(4, d, 16), capacity, "loop", drop_policy=policy, min_capacity=min_capacity)
    if name in DROPS:  # which slots one process keeps under this policy and under the default one
        KEPT[name] = {}
        for p, m in ((policy, min_capacity), ("position", 1)):
            probe = copy.deepcopy(full)
            probe.drop_policy, probe.min_capacity = p, m
            with torch.no_grad():
                KEPT[name][f"{p}/{m}"] = probe.compute(x, probe.route(x, ids))[1].tolist()  # [T, k] slots computed
    ep = shard_experts(torch.nn.Sequential(copy.deepcopy(full)), chunks=CHUNKS.get(name, 2), exchange=exchange)[0]
    assert ep.dispatcher.name == EXCHANGE_DISPATCHERS[exchange]
    grad_out = torch.randn(T, d)

    ref_x = x.clone().requires_grad_()
    ref = full(ref_x, ids)
    (ref * grad_out).sum().backward()

    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    mine = x[lo:hi].clone().requires_grad_()
    out = ep(mine, ids[lo:hi])
    (out * grad_out[lo:hi]).sum().backward()

    err = {"out": (out - ref[lo:hi]).abs().max().item() if hi > lo else 0.0}
    err["grad_x"] = (mine.grad - ref_x.grad[lo:hi]).abs().max().item() if hi > lo else 0.0
    for pname, p in ep.router.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        err[f"router.{pname}"] = (g - dict(full.router.named_parameters())[pname].grad).abs().max().item()
    for pname, p in ep.experts.named_parameters():
        g = all_gather_rows(p.grad if p.grad is not None else torch.zeros_like(p)).flatten(0, 1)
        err[f"experts.{pname}"] = (g - getattr(full.experts, pname).grad).abs().max().item()
    load = ep.stats.load.clone()
    dist.all_reduce(load)
    err["load"] = (load - full.stats.load).abs().max().item()
    return err


def trainer_case(router: dict, out: Path, rank: int, world: int) -> dict:
    trainer = Trainer(config(router, out / "runs", expert=world), log=False)
    par = trainer.parallel
    # the trainer shards with exchange="auto": static splits up to 4 ranks (equal batch slices), the sizes tested here
    layers = trainer.model.moe_layers()
    assert {m.dispatcher.name for m in layers} == {"all_gather"}
    # each rank built only its own experts (never the whole bank)
    assert all(m.experts.num_experts * world == m.experts.total_experts and m.experts.first_expert == rank * m.experts.num_experts for m in layers)
    batch = trainer.task.batch("train", 8, torch.Generator().manual_seed(99))
    loss, logits = trainer.task_loss(par.shard_batch(batch))
    aux = trainer.model.aux_losses()
    total = loss + sum(aux.values()) if aux else loss
    par.backward(total)
    par.sync_grads(trainer.model)
    grads = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads[name] = par._gather(g) if ".experts." in name else g.clone()
    total = total.detach().reshape(1)
    dist.all_reduce(total)  # the global mean loss: ranks hold equal slices
    result = {"logits": all_gather_rows(logits.detach()).flatten(0, 1), "total": float(total) / world, "grads": grads}
    trainer.optimizer.zero_grad(set_to_none=True)
    result["losses"] = [trainer.train_step() for _ in range(3)]
    result["buffers"] = {n: b.clone() for n, b in trainer.model.named_buffers() if b.is_floating_point()}
    if router["name"] == "softmax_topk":  # checkpoint written by all ranks; the test resumes it in 1 process
        trainer.save(out / "ep2.pt")
        result["next_loss"] = trainer.train_step()
    trainer.close()
    return result


def resume_case(router: dict, out: Path, checkpoint: str, world: int) -> float:
    """A checkpoint written by 1 process, resumed on `world` ranks: the next step's loss."""
    trainer = Trainer(config(router, out / "runs2", expert=world), log=False, resume=checkpoint)
    loss = trainer.train_step()
    trainer.close()
    return loss


def balance_case(rank: int) -> list[list[float]]:
    """Global-batch balance loss (issue 17): even ranks route all tokens to expert 0, odd ranks to expert 1.
    Every rank's (micro-batch loss, global loss), gathered."""
    from routerlab.routers import build_router

    r = build_router({"name": "softmax_topk", "k": 1, "balance_batch": 1.0, "balance_global": 1.0}, 8, 2).train()
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0], r.gate.weight[1, 0] = 1.0, -1.0
    v = torch.zeros(8)
    v[0] = 1.0 if rank % 2 == 0 else -1.0
    aux = r(torch.stack([v] * 4)).aux
    mine = torch.tensor([float(aux["balance_batch"]), float(aux["balance_global"])])
    every = [torch.zeros(2) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def main() -> None:
    out, one_process_ckpt = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"layer": {}, "trainer": {}}
    for name in LAYER_CASES:
        results["layer"][name] = layer_case(name, rank, world)
        if fixed_ok(name):
            results["layer"][f"{name}_fixed"] = layer_case(name, rank, world, "fixed")
    results["kept"] = KEPT
    for key, router in ROUTERS.items():
        results["trainer"][key] = trainer_case(router, out, rank, world)
    results["balance"] = balance_case(rank)
    results["resumed_from_one_process"] = resume_case(ROUTERS["softmax_topk"], out, one_process_ckpt, world)
    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
