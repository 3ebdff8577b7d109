"""Issue 19 v7: the dispatch plan's stable sort of the E=64, k=6 preset's expert ids, int64 keys against the int16 keys of
routerlab.moe.layer.stable_order (cast included), on one GPU in one run; the two orders are checked equal first.

    python3 benchmarks/plan_sort.py
"""
import torch

from routerlab.bench.core import time_cuda
from routerlab.moe.layer import stable_order

T, k, E = 16384, 6, 64
torch.manual_seed(0)
experts = torch.randn(T, E, device="cuda").topk(k, dim=-1).indices
key = experts.t().reshape(-1)
assert torch.equal(stable_order(key, E), torch.argsort(key, stable=True))
a = time_cuda(lambda: torch.argsort(key, stable=True), 50)
b = time_cuda(lambda: stable_order(key, E), 50)
print(f"# H200, {torch.__version__}: stable argsort of {T*k} expert ids in [0, {E}], median ms of 50: int64 keys {a:.4f}, "
      f"int16 keys (stable_order, cast included) {b:.4f}, ratio {a/b:.2f}x; same order")
