"""What the trainer needs to run on several processes (torchrun), and nothing when it runs on one.

`setup_parallel(expert, device, batch_size)` returns a `SingleProcess` (every method a no-op or the plain
single-process version) unless torchrun started several processes; then an `ExpertParallel` that
  - starts the process group from torchrun's environment (NCCL on CUDA, gloo on CPU),
  - splits the world into expert-parallel groups of `expert` consecutive ranks (experts sharded inside a
    group, routerlab.moe.parallel) and replica groups (the ranks that hold the same experts),
  - gives each rank its slice of the global batch and backpropagates its share of the global mean loss;
    sums non-expert gradients over all ranks and expert gradients over their replica group,
  - reduces every layer's RoutingStats over all ranks (sums; max_logit by max) BEFORE router.after_step
    and logging, and averages the routers' float buffers after the step, so stateful routers agree
    across ranks without any distributed code of their own,
  - gathers full expert tensors (weights and optimizer state) for checkpoints and slices them on load,
    so a checkpoint moves between any numbers of ranks.
Imports torch only (the GPU benchmark imports it on a machine without pydantic). See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from routerlab.errors import ConfigError
from routerlab.moe.experts import ExpertBank, expert_shard
from routerlab.moe.parallel import all_gather_rows, shard_experts
from routerlab.moe.stats import RoutingStats


def expert_param_names(model: nn.Module) -> set[str]:
    """Names of the parameters that belong to an ExpertBank (the tensors experts are sharded along)."""
    return {f"{prefix}.{name}" if prefix else name for prefix, m in model.named_modules() if isinstance(m, ExpertBank) for name, _ in m.named_parameters()}


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    experts = expert_param_names(model)
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if name in experts else dense).append(p)
    return dense, expert


class SingleProcess:
    """One process: the trainer's plain behaviour."""

    rank, world_size, expert_size, is_main = 0, 1, 1, True

    def device(self, name: str) -> torch.device:
        return torch.device(name)

    def building(self):
        """Context in which the model is built (expert parallelism: each bank holds only this rank's experts)."""
        return contextlib.nullcontext()

    def shard(self, model: nn.Module) -> nn.Module:
        return model

    def shard_batch(self, batch):
        return batch

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def sync_grads(self, model: nn.Module) -> None:
        pass

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def reduce_step(self, layers, loss: Tensor, bad: Tensor) -> tuple[float, bool]:
        """(the step's loss, whether it was finite): the step's one host read, of both at once."""
        value, flag = torch.stack([loss.detach().float(), bad.float()]).tolist()
        return value, not flag

    def sync_buffers(self, model: nn.Module) -> None:
        pass

    def num_params(self, module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return model.state_dict(), optimizer.state_dict()

    def local_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> tuple[dict, dict]:
        return model_state, optimizer_state

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class ExpertParallel(SingleProcess):
    """Several processes: expert parallelism inside groups of `expert` ranks, data parallelism across all."""

    def __init__(self, expert: int, device: str) -> None:
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.is_main = self.rank == 0
        if self.world_size % expert:
            raise ConfigError(f"parallel.expert={expert} must divide the number of processes ({self.world_size}); use a divisor of it")
        self.expert_size = expert
        self.cuda = device.split(":")[0] == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.cuda else "gloo", timeout=timedelta(minutes=10))
        # every rank creates every group, in the same order (torch.distributed requires it)
        self.expert_group = self.replica_group = None
        for start in range(0, self.world_size, expert):
            group = dist.new_group(list(range(start, start + expert)))
            if start <= self.rank < start + expert:
                self.expert_group = group
        for offset in range(expert):
            group = dist.new_group(list(range(offset, self.world_size, expert)))
            if self.rank % expert == offset:
                self.replica_group = group
        self.replicas = self.world_size // expert
        self.expert_rank = self.rank % expert

    def device(self, name: str) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.cuda else torch.device(name)

    def building(self):
        """ExpertBanks built inside hold only this rank's block of experts, with the values the whole bank
        would have from the same seed: no rank ever builds the whole bank."""
        return expert_shard(self.expert_rank, self.expert_size) if self.expert_size > 1 else contextlib.nullcontext()

    def shard(self, model: nn.Module) -> nn.Module:
        return shard_experts(model, self.expert_group, exchange="auto") if self.expert_size > 1 else model  # equal batch slices: fixed splits are safe

    def shard_batch(self, batch):
        """This rank's contiguous slice of the global batch (every rank draws the same global batch)."""
        size = batch.inputs.shape[0]
        if size % self.world_size:
            raise ConfigError(f"train.batch_size={size} must be divisible by the number of processes ({self.world_size})")
        n = size // self.world_size
        part = lambda t: None if t is None else t[self.rank * n : (self.rank + 1) * n]  # noqa: E731
        return dataclasses.replace(batch, **{f.name: part(getattr(batch, f.name)) for f in dataclasses.fields(batch)})

    # ---- gradients --------------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        """Backward of this rank's share of the global mean loss: its slice's mean / world size (ranks hold equal
        slices). Then every gradient is a plain sum over ranks, and sync_grads never rescales the expert
        gradients (a pass over ~1 GB per step on the 2 x H200 benchmark: 0.8 ms)."""
        (loss / self.world_size).backward()

    def _all_reduce_grads(self, params: list[nn.Parameter], group):
        """Start summing grads over `group` (None = all ranks) in one flat buffer; returns the function that
        finishes it (waits for the all_reduce, sets the grads), so other work can run meanwhile.

        A grad that is None on every rank stays None (as one process would leave it). Without a host sync
        when every grad exists on this rank (then it exists everywhere): the "used" flags travel in the
        same all_reduce (same shapes on every rank) but are read back only by a rank that lacks a grad.
        """
        if not params:
            return lambda: None
        all_here = all(p.grad is not None for p in params)
        first = params[0]
        if all_here:  # a fill, not a host-to-device copy (which would synchronize)
            used = torch.ones(len(params), dtype=first.dtype, device=first.device)
        else:
            used = torch.tensor([p.grad is not None for p in params], dtype=first.dtype, device=first.device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params] + [used])
        work = dist.all_reduce(flat, group=group, async_op=True)

        def finish() -> None:
            work.wait()
            used_anywhere = [True] * len(params) if all_here else flat[-len(params):].tolist()
            offset = 0
            for p, was_used in zip(params, used_anywhere):
                if was_used:
                    p.grad = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()

        return finish

    def sync_grads(self, model: nn.Module) -> None:
        """After backward(loss): gradients of the global mean loss, summed over the ranks that hold each parameter.

        Expert gradients already hold the contributions of every rank of the expert group (the backward
        exchange brought them); only replicas of the same experts sum theirs.
        """
        dense, expert = _split(model)
        finish_dense = self._all_reduce_grads(dense, None)  # in flight while the replicas sum expert grads
        if self.replicas > 1:
            self._all_reduce_grads(expert, self.replica_group)()
        finish_dense()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """torch's clip_grad_norm_ over the whole (sharded) model: expert squares summed over the expert group."""
        dense, expert = _split(model)
        device = next(model.parameters()).device
        square = lambda ps: sum((p.grad.float().square().sum() for p in ps if p.grad is not None), torch.zeros((), device=device))  # noqa: E731
        expert_sq = square(expert)
        if self.expert_size > 1:
            dist.all_reduce(expert_sq, group=self.expert_group)
        total = (square(dense) + expert_sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in dense + expert:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total

    # ---- routing statistics and router state ------------------------------------------------------
    def reduce_step(self, layers, loss: Tensor, bad: Tensor) -> tuple[float, bool]:
        """Replace every layer's stats by their sum over all ranks; return the global mean loss and whether this
        rank's step was finite (`bad`: this rank's flag), read together."""
        sums, maxes, layout = [loss.detach().float().reshape(1)], [], []
        for layer in layers:
            entry = []
            for f in dataclasses.fields(RoutingStats):
                value = getattr(layer.stats, f.name)
                if value is None:
                    continue
                (maxes if f.name == "max_logit" else sums).append(value.float().reshape(-1))
                entry.append((f.name, value.shape))
            layout.append(entry)
        flat_sum = torch.cat(sums)
        dist.all_reduce(flat_sum)
        if maxes:
            flat_max = torch.cat(maxes)
            dist.all_reduce(flat_max, op=dist.ReduceOp.MAX)
        offsets = {"sum": 1, "max": 0}
        for layer, entry in zip(layers, layout):
            values = {}
            for name, shape in entry:
                src, kind = (flat_max, "max") if name == "max_logit" else (flat_sum, "sum")
                n = math.prod(shape)
                values[name] = src[offsets[kind] : offsets[kind] + n].view(shape)
                offsets[kind] += n
            layer.stats = RoutingStats(**values)
        total, flag = torch.stack([flat_sum[0], bad.float()]).tolist()
        return total / self.world_size, not flag

    def sync_buffers(self, model: nn.Module) -> None:
        """Average floating-point buffers (router EMAs, biases) over all ranks; integer tables are fixed."""
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1).float() for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def num_params(self, module: nn.Module) -> int:
        experts = expert_param_names(module)
        return sum(p.numel() * (self.expert_size if name in experts else 1) for name, p in module.named_parameters())

    # ---- checkpoints ------------------------------------------------------------------------------
    def _gather(self, t: Tensor) -> Tensor:
        return all_gather_rows(t, self.expert_group).flatten(0, 1)

    def _expert_indices(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, nn.Parameter]:
        """Optimizer-state index -> expert parameter (state_dict numbers params in param-group order)."""
        experts = {id(p) for name, p in model.named_parameters() if name in expert_param_names(model)}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: p for i, p in enumerate(params) if id(p) in experts}

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """State dicts with full expert tensors (a collective: every rank of the group must call it)."""
        model_state, opt_state = model.state_dict(), optimizer.state_dict()
        if self.expert_size == 1:
            return model_state, opt_state
        for name in sorted(expert_param_names(model)):
            model_state[name] = self._gather(model_state[name]).cpu()
        # state_dict() shares the live per-parameter dicts: copy before replacing tensors
        opt_state = {**opt_state, "state": {i: dict(s) for i, s in opt_state["state"].items()}}
        for index, param in sorted(self._expert_indices(model, optimizer).items()):
            for key, value in sorted(opt_state["state"].get(index, {}).items()):
                if torch.is_tensor(value) and value.shape == param.shape:
                    opt_state["state"][index][key] = self._gather(value).cpu()
        return model_state, opt_state

    def local_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> tuple[dict, dict]:
        """Slice full expert tensors (from a checkpoint of any number of ranks) down to this rank's experts."""
        if self.expert_size == 1:
            return model_state, optimizer_state

        def local(value: Tensor, param: nn.Parameter) -> Tensor:
            if value.shape[0] == param.shape[0] * self.expert_size and value.shape[1:] == param.shape[1:]:
                n = param.shape[0]
                return value[self.expert_rank * n : (self.expert_rank + 1) * n]
            return value  # a wrong shape is reported by load_state_dict

        params = dict(model.named_parameters())
        model_state = dict(model_state)
        for name in expert_param_names(model):
            if name in model_state:
                model_state[name] = local(model_state[name], params[name])
        optimizer_state = {**optimizer_state, "state": {i: dict(s) for i, s in optimizer_state["state"].items()}}
        for index, param in self._expert_indices(model, optimizer).items():
            for key, value in optimizer_state["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.dim() == param.dim():
                    optimizer_state["state"][index][key] = local(value, param)
        return model_state, optimizer_state

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_parallel(expert: int = 1, device: str = "cpu") -> SingleProcess:
    """SingleProcess unless torchrun (WORLD_SIZE > 1) started this process; parallel.expert > 1 needs torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if expert > 1:
            raise ConfigError(f"parallel.expert={expert} needs {expert} processes; launch with torchrun --nproc-per-node {expert} -m routerlab train ...")
        return SingleProcess()
    return ExpertParallel(expert, device)
