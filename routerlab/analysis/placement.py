"""Expert-placement simulator: given recorded expert loads and a number of ranks, the per-rank load, its
overload factor (max rank load / mean rank load) and the projected step time of expert parallelism under
four placements:

    contiguous   rank r holds experts [r E/R, (r+1) E/R)   (what routerlab's ExpertParallel does)
    round_robin  expert e on rank e mod R
    greedy       heaviest expert first onto the least-loaded rank with a free slot (E/R slots a rank)
    eplb         DeepSeek's EPLB: `redundant` extra replicas, each given to the expert with the highest
                 load per replica (its load is split evenly over its replicas), then the greedy packing of
                 the (E + redundant) replicas, (E + redundant)/R a rank

Step time (weak scaling, T tokens a rank, the fixed exchange routerlab uses up to 4 ranks):

    step = non_expert + sum over MoE layers of [ rows of the busiest rank * 18 d h / GEMM rate ]
           + layers * 2 (forward, backward) * (all_gather + reduce_scatter of a T x d bf16 block)

where a rank's rows are R T k times its share of the layer's token-slots, and the rates are measured
(docs/benchmarks.md, expert parallelism v7: `RATES_FROM_LOG` reads them from a bench_parallel log). Not
modelled: replicas' extra weight memory and gradient all-reduce, overlap of exchange and compute, GEMM
efficiency changing with rows per expert.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from routerlab.errors import ConfigError

STRATEGIES = ("contiguous", "round_robin", "greedy", "eplb")


@dataclass(frozen=True)
class Shape:
    tokens: int  # T, tokens a rank per step
    d_model: int
    hidden: int  # expert hidden size h (SwiGLU)
    k: int
    layers: int  # MoE layers
    num_experts: int


@dataclass(frozen=True)
class Rates:
    """Measured on one machine: the 1-GPU step, the GEMM rate of the expert FFN (fwd+bwd), and each
    collective's time for one T x d bf16 block at each measured rank count."""

    one_gpu_ms: float
    expert_ms: float  # ExpertBank forward + backward alone, all layers, T*k rows, one GPU
    all_gather_ms: dict[int, float] = field(default_factory=dict)  # ranks -> ms per block
    reduce_scatter_ms: dict[int, float] = field(default_factory=dict)

    def gemm_tflops(self, shape: Shape) -> float:
        return shape.layers * shape.tokens * shape.k * 18 * shape.d_model * shape.hidden / (self.expert_ms * 1e-3) / 1e12

    def exchange_ms(self, ranks: int) -> float:
        """all_gather + reduce_scatter of one block at `ranks`; from the nearest measured rank count,
        scaled by (ranks - 1) / (measured - 1) (bytes each rank sends)."""
        if ranks == 1:
            return 0.0
        if not self.all_gather_ms:
            raise ConfigError("no measured collective rates; give a bench_parallel log with 'exchange alone' timings")
        near = min(self.all_gather_ms, key=lambda r: (abs(r - ranks), r))
        scale = (ranks - 1) / (near - 1)
        return (self.all_gather_ms[near] + self.reduce_scatter_ms[near]) * scale


@dataclass
class Placement:
    strategy: str
    ranks: int
    rank_load: np.ndarray  # [R] share of the layer's token-slots on each rank (sums to 1)
    experts_on: list[list[tuple[int, float]]]  # per rank: (expert, share of that expert's load)

    @property
    def overload(self) -> float:
        return float(self.rank_load.max() / self.rank_load.mean())


def _pack(items: list[tuple[int, float, float]], ranks: int) -> list[list[tuple[int, float]]]:
    """Greedy balanced packing: heaviest item first onto the least-loaded rank with a free slot."""
    slots = len(items) // ranks
    bins: list[list[tuple[int, float]]] = [[] for _ in range(ranks)]
    totals = np.zeros(ranks)
    for expert, load, share in sorted(items, key=lambda it: (-it[1], it[0])):
        free = [r for r in range(ranks) if len(bins[r]) < slots]
        r = min(free, key=lambda r: (totals[r], r))
        bins[r].append((expert, share))
        totals[r] += load
    return bins


def place(loads, ranks: int, strategy: str, redundant: int = 0) -> Placement:
    """Place E experts with these loads (token-slots, any scale) on `ranks` ranks."""
    loads = np.asarray(loads, dtype=np.float64)
    E = len(loads)
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown placement {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if ranks < 1 or E % ranks:
        raise ConfigError(f"{E} experts cannot be split evenly over {ranks} ranks; use a rank count that divides {E}")
    if strategy == "eplb" and (redundant < 0 or (E + redundant) % ranks):
        raise ConfigError(f"eplb needs E + redundant divisible by ranks ({E} + {redundant} over {ranks})")
    share = loads / loads.sum() if loads.sum() > 0 else np.full(E, 1.0 / E)
    if strategy == "contiguous":
        bins = [[(e, 1.0) for e in range(r * E // ranks, (r + 1) * E // ranks)] for r in range(ranks)]
    elif strategy == "round_robin":
        bins = [[(e, 1.0) for e in range(r, E, ranks)] for r in range(ranks)]
    elif strategy == "greedy":
        bins = _pack([(e, share[e], 1.0) for e in range(E)], ranks)
    else:
        replicas = np.ones(E, dtype=int)
        for _ in range(redundant):
            e = int(np.argmax(share / replicas))  # lowest index on ties
            replicas[e] += 1
        items = [(e, share[e] / replicas[e], 1.0 / replicas[e]) for e in range(E) for _ in range(replicas[e])]
        bins = _pack(items, ranks)
    rank_load = np.array([sum(share[e] * s for e, s in b) for b in bins])
    return Placement(strategy, ranks, rank_load, bins)


def project_step_ms(layer_loads: list, ranks: int, strategy: str, shape: Shape, rates: Rates, redundant: int = 0) -> dict[str, float]:
    """Projected step time (ms) and its parts for this placement of every layer's recorded loads."""
    gemm = rates.gemm_tflops(shape) * 1e12
    flops_per_row = 18 * shape.d_model * shape.hidden
    non_expert = rates.one_gpu_ms - rates.expert_ms
    expert, overload = 0.0, []
    for loads in layer_loads:
        p = place(loads, ranks, strategy, redundant)
        rows = ranks * shape.tokens * shape.k * p.rank_load.max()
        expert += rows * flops_per_row / gemm * 1e3
        overload.append(p.overload)
    scale = shape.layers / len(layer_loads)  # loads given for fewer layers than the shape: repeat them
    expert *= scale
    exchange = shape.layers * 2 * rates.exchange_ms(ranks)
    return {"step_ms": non_expert + expert + exchange, "non_expert_ms": non_expert, "expert_ms": expert,
            "exchange_ms": exchange, "overload": float(np.max(overload))}


# --- the measured rates, read from a bench_parallel log (benchmarks/h200/*ep-v7*) --------------------------

def rates_from_log(path: str | Path) -> tuple[Shape, Rates, dict[int, float]]:
    """(shape, rates, {ranks: measured ms/step of the fixed exchange, 1 chunk}) from `routerlab.bench_parallel` output."""
    text = Path(path).read_text(encoding="utf-8")

    def find(pattern: str) -> re.Match:
        m = re.search(pattern, text)
        if m is None:
            raise ConfigError(f"{path}: no line matching {pattern!r}; give a routerlab.bench_parallel log (v7 or later)")
        return m

    d, E, k, h = (int(x) for x in find(r"d=(\d+), experts E=(\d+) k=(\d+) h=(\d+)").groups())
    blocks = int(find(r"(\d+) MoE transformer blocks").group(1))
    tokens = int(find(r"= (\d+) tokens").group(1))
    one = float(find(r"1 GPU :\s+([\d.]+) ms/step").group(1))
    expert = float(find(r"expert compute .*?; 1 GPU ([\d.]+) ms").group(1))
    ex = find(r"all_gather ([\d.]+) ms .*?reduce_scatter ([\d.]+) ms")
    ranks = int(find(r"(\d+) GPUs, fixed splits, 1 chunk").group(1))
    measured = {ranks: float(find(r"\d+ GPUs, fixed splits, 1 chunk\(s\) per layer:\s+([\d.]+) ms/step").group(1))}
    rates = Rates(one, expert, {ranks: float(ex.group(1))}, {ranks: float(ex.group(2))})
    return Shape(tokens, d, h, k, blocks, E), rates, measured
