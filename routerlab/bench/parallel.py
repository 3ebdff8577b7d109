"""Expert-parallel benchmark for GPUs; needs torch alone (no pydantic). docs/distributed.md.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m routerlab.bench.parallel

1. equivalence: one MoE layer sharded over the ranks vs the same layer unsharded on the whole batch (bf16);
2. weak scaling: a small MoE transformer (fine-grained experts: E=64, k=6, d=2048, h=1408) at a fixed
   per-GPU batch, forward + backward + gradient sync: every GPU with all experts and no communication
   (the 1-GPU figure), then the experts sharded over all ranks;
   (the expert-parallel layer with fixed splits (all_gather + reduce_scatter, no host sync) and 1 token chunk
   per layer, variable splits (all_to_all, one host sync per layer) and 1 chunk, fixed splits and 2 chunks:
   chunk 2's exchange overlaps chunk 1's experts);
3. where the time goes: GPU kernel time per step by kind (profiler: each NCCL collective, the rest; NCCL
   kernels include waiting for the peer), host synchronizations per step (CUDA sync debug mode), against
   expert compute (ExpertBank alone) and each collective alone (ranks in step: the transfer itself).
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from routerlab.bench.core import check_correctness
from routerlab.distributed import ExpertParallel
from routerlab.models.transformer import MoETransformerLM
from routerlab.moe import ExpertBank, MoELayer
from routerlab.moe.parallel import AllGather, AllToAll, ReduceScatter, all_gather_rows, shard_experts
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams


def say(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def equivalence(device, exchange: str, dtype=torch.bfloat16) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    d, h, E, k, T = 512, 1024, 64, 6, 4096
    full = MoELayer(SoftmaxTopK(d, E, SoftmaxTopKParams(k=k)), ExpertBank(E, d, h)).to(device, dtype)
    ep = shard_experts(torch.nn.Sequential(copy.deepcopy(full)), exchange=exchange)[0]
    x = torch.randn(T * world, d, device=device, dtype=dtype)
    g = torch.randn_like(x)
    ref_x = x.clone().requires_grad_()
    ref = full(ref_x)
    (ref.float() * g.float()).sum().backward()
    mine = x[rank * T : (rank + 1) * T].clone().requires_grad_()
    out = ep(mine)
    (out.float() * g[rank * T : (rank + 1) * T].float()).sum().backward()
    rel = lambda a, b: float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())  # noqa: E731
    errs = {"output": rel(all_gather_rows(out.detach()).flatten(0, 1), ref), "grad_x": rel(all_gather_rows(mine.grad).flatten(0, 1), ref_x.grad)}
    for name, p in ep.experts.named_parameters():
        errs[f"grad_{name}"] = rel(all_gather_rows(p.grad).flatten(0, 1), full.experts.get_parameter(name).grad)
    gw = ep.router.gate.weight.grad.float() if hasattr(ep.router, "gate") else next(ep.router.parameters()).grad.float()
    dist.all_reduce(gw)
    gw_ref = full.router.gate.weight.grad if hasattr(full.router, "gate") else next(full.router.parameters()).grad
    errs["grad_router"] = rel(gw, gw_ref)
    say(f"equivalence bf16 NCCL, {exchange} splits, {world} ranks vs 1 layer (relative L2 error): " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


def cut_plan_check(device) -> None:
    """The receiver's plan cut by first_rows (every padding slot on one spare row) against the full padded
    plan, on the GPU path (Triton combine/permute kernels, grouped experts): outputs and gradients."""
    from routerlab.moe.layer import combine, moe_compute, permute, plan_dispatch
    from routerlab.moe.parallel import first_rows

    torch.manual_seed(0)
    R, d, E, k = 4096, 512, 32, 6
    bank = ExpertBank(E, d, 256).to(device, torch.bfloat16)
    ids = torch.randint(-1, E, (R, k), device=device)
    ids[:, 0] = ids[:, 0].clamp(min=0)
    weights = torch.rand(R, k, device=device)
    x = torch.randn(R, d, device=device, dtype=torch.bfloat16)
    g = torch.randn(R, d, device=device)
    results = []
    for compact in (False, True):
        bank.zero_grad()
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        if compact:
            plan = first_rows(plan_dispatch(ids, E, None), int((ids >= 0).sum()))
            out = combine(bank(permute(xx, plan), plan.counts), ww, plan)
        else:
            out, _ = moe_compute(xx, ids, ww, bank, None)
        (out.float() * g).sum().backward()
        results.append([out.detach(), xx.grad, ww.grad, bank.w_in.grad, bank.w_out.grad])
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(*results))
    say(f"cut plan (first_rows) vs padded plan on the GPU path: max abs difference over output and grads {diff:.3g}")


def make_model(device, layers: int, d: int, h: int, E: int, k: int, vocab: int, block: int):
    cfg = SimpleNamespace(d_model=d, n_layers=layers, n_heads=16, moe_every=1, num_experts=E, expert_hidden=h, dense_hidden=None, activation="swiglu", capacity_factor=None, backend="auto")
    torch.manual_seed(0)
    return MoETransformerLM(cfg, {"name": "softmax_topk", "k": k}, vocab, block).to(device, torch.bfloat16)


def kernel_kind(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        kinds = {"sendrecv": "all-to-all", "alltoall": "all-to-all", "allreduce": "all-reduce", "allgather": "all-gather", "reducescatter": "reduce-scatter"}
        return "nccl " + next((kind for key, kind in kinds.items() if key in low), "other")
    return "compute"


def seconds_per_call(fn, steps: int, warmup: int = 3) -> float:
    """Wall seconds per call of fn on the GPU, after warm-up calls, every rank starting together."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def timed_steps(model, par, batch, targets, steps: int, profile: bool = False) -> tuple[float, dict]:
    """Seconds per forward+backward+grad sync; with profile, GPU kernel seconds per step by kind, top kernels
    and host syncs per step."""
    def step():
        logits = model(batch)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if par is None:
            loss.backward()
        else:
            par.backward(loss)
            par.sync_grads(model)
        for p in model.parameters():
            p.grad = None

    seconds = seconds_per_call(step, steps)
    info: dict = {}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        by_kind, by_name = defaultdict(float), defaultdict(float)
        for e in p.events():  # kernel events only: CPU ops would count their kernels a second time
            if e.device_type == torch.autograd.DeviceType.CUDA:
                us = e.time_range.elapsed_us() / 3
                by_kind[kernel_kind(e.name)] += us / 1e6
                by_name[e.name[:70]] += us / 1e6
        info["kinds"] = dict(by_kind)
        info["top"] = sorted(by_name.items(), key=lambda kv: -kv[1])[:16]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode("default")
        where = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
        info["syncs"], info["sync_sites"] = len(where), sorted(set(where))
    return seconds, info


def expert_compute(device, T: int, d: int, h: int, E: int, k: int, steps: int = 10) -> float:
    """Seconds per forward+backward of one ExpertBank over T*k balanced rows (what one layer computes per GPU)."""
    bank = ExpertBank(E, d, h).to(device, torch.bfloat16)
    x = torch.randn(T * k, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    counts = torch.full((E,), T * k // E, device=device)
    counts[: T * k - int(counts.sum())] += 1
    g = torch.randn(T * k, d, device=device, dtype=torch.bfloat16)
    return seconds_per_call(lambda: bank(x, counts).backward(g), steps)


def exchange_alone(device, T: int, d: int, steps: int = 20) -> dict[str, float]:
    """Seconds per collective of the fixed exchange (T rows of d bf16 per rank) with nothing else running
    and the ranks in step: the transfer itself, without the peer wait that the training step's NCCL
    kernels include."""
    world = dist.get_world_size()
    x = torch.randn(T, d, device=device, dtype=torch.bfloat16)
    wide = torch.randn(world * T, d, device=device, dtype=torch.bfloat16)
    splits = [T] * world
    ops = {"all_gather": lambda: AllGather().start(x, world * T)[1].wait(), "reduce_scatter": lambda: ReduceScatter().start(wide, T)[1].wait(),
           "all_to_all_single": lambda: AllToAll(splits, splits).start(wide, world * T)[1].wait()}
    return {name: seconds_per_call(op, steps) for name, op in ops.items()}


def main() -> None:
    assert os.environ.get("NCCL_NVLS_ENABLE") == "0", "keep NVLink multicast off: NCCL_NVLS_ENABLE=0"
    world = int(os.environ["WORLD_SIZE"])
    par = ExpertParallel(world, "cuda")
    device = torch.device("cuda", par.local_rank)
    say(f"torch {torch.__version__}, {world} x {torch.cuda.get_device_name(device)}")
    for exchange in ("fixed", "variable"):
        equivalence(device, exchange)
    cut_plan_check(device)
    errors = check_correctness(device, capacity_factor=0.5)
    say("GPU kernels vs the pure-PyTorch loop, capacity factor 0.5 (padding rows left unset, freed memory NaN), relative L2 error: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))

    layers, d, h, E, k, vocab, seqs, block = 2, 2048, 1408, 64, 6, 4096, 8, 2048
    T = seqs * block
    gen = torch.Generator(device=device).manual_seed(1 + par.rank)
    batch = torch.randint(0, vocab, (seqs, block), device=device, generator=gen)
    targets = torch.randint(0, vocab, (seqs, block), device=device, generator=gen)
    say(f"model: {layers} MoE transformer blocks, d={d}, experts E={E} k={k} h={h} (SwiGLU), vocab {vocab}; per-GPU batch {seqs}x{block} = {T} tokens, bf16, fwd+bwd")

    model = make_model(device, layers, d, h, E, k, vocab, block)
    one, one_info = timed_steps(model, None, batch, targets, steps=10, profile=True)  # every GPU alone, all experts
    del model
    torch.cuda.empty_cache()
    runs = {}
    for exchange, chunks in (("fixed", 1), ("variable", 1), ("fixed", 2)):
        model = shard_experts(make_model(device, layers, d, h, E, k, vocab, block), par.expert_group, chunks=chunks, exchange=exchange)
        runs[exchange, chunks] = timed_steps(model, par, batch, targets, steps=10, profile=True)
        del model
        torch.cuda.empty_cache()
    alone = exchange_alone(device, T, d)
    experts_full = expert_compute(device, T, d, h, E, k)
    experts_local = expert_compute(device, T, d, h, E // world, k)
    experts_half = expert_compute(device, T // 2, d, h, E // world, k)
    say(f"1 GPU : {one * 1e3:8.2f} ms/step  {T / one:12,.0f} tokens/s  (GPU kernels {sum(one_info['kinds'].values()) * 1e3:.2f} ms, host syncs/step {one_info['syncs']})")
    say(f"1 GPU host syncs at: {', '.join(one_info['sync_sites'])}")
    say("  top kernels per step, ms:")
    for name, sec in one_info["top"]:
        say(f"    {sec * 1e3:7.2f}  {name}")
    say(f"expert compute (ExpertBank fwd+bwd alone, T*k rows): {layers} layers x {experts_local * 1e3:.2f} ms = {layers * experts_local * 1e3:.2f} ms "
        f"(E/{world} experts; as 2 chunks of T/2: {layers} x 2 x {experts_half * 1e3:.2f} ms = {layers * 2 * experts_half * 1e3:.2f}); 1 GPU {layers * experts_full * 1e3:.2f} ms")
    say(f"exchange alone ({T} x {d} bf16 per rank, ranks in step, no peer wait): "
        + ", ".join(f"{name} {sec * 1e3:.3f} ms ({T * d * 2 * (world - 1) / sec / 1e9:.0f} GB/s sent per rank)" for name, sec in alone.items()))
    for (exchange, chunks), (ep, info) in runs.items():
        say(f"{world} GPUs, {exchange} splits, {chunks} chunk(s) per layer: {ep * 1e3:8.2f} ms/step  {world * T / ep:12,.0f} tokens/s  (weak-scaling speedup {world * one / ep:.2f}x, efficiency {one / ep:.0%})")
        say("  per step (rank 0), GPU kernel ms by kind: " + ", ".join(f"{kk} {v * 1e3:.2f}" for kk, v in sorted(info["kinds"].items()))
            + f"; total {sum(info['kinds'].values()) * 1e3:.2f} (kernels overlap when chunked); host syncs/step {info['syncs']} ({layers} MoE layers) at {', '.join(info['sync_sites'])}")
        say("  top kernels per step (rank 0), ms:")
        for name, sec in info["top"]:
            say(f"    {sec * 1e3:7.2f}  {name}")
    par.close()


if __name__ == "__main__":
    main()
