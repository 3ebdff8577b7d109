"""All-to-all volume saved by group-limited (node-limited) routing, DeepSeek-V3 style (issue 17, item 4).

E experts on R ranks (contiguous blocks = the groups), top-k per token. A dispatch that sends a token once per
destination rank moves (distinct ranks per token) copies; one that sends once per slot moves k. For each
top_groups M, the script reports the mean distinct ranks per token, that volume relative to the unlimited
router and to once-per-slot sending, and the routing score kept (sum of the chosen sigmoid scores relative
to the unlimited top-k). Scores are synthetic: a sigmoid gate N(0, 0.1^2) over x ~ N(0, I), d = 64.
Usage: OMP_NUM_THREADS=1 python benchmarks/group_limited.py [E] [k] [R]
"""
import sys

import torch

from routerlab.routers import build_router
from routerlab.routers.balancing import groups_per_token


@torch.no_grad()
def measure(router_spec: dict, x: torch.Tensor, E: int, k: int, R: int) -> list[tuple]:
    rows = []
    base = None
    for M in [R, R // 2, max(1, R // 4), 1]:
        r = build_router({**router_spec, "k": k, "expert_groups": R, "top_groups": M if M < R else 0}, x.shape[1], E)
        r.load_state_dict(state)
        out = r(x)
        s = torch.sigmoid(x @ r.gate.weight.T)
        kept = float(s.gather(1, out.experts).sum())
        ranks = groups_per_token(out.experts, E // R).float()
        if base is None:
            base = (float(ranks.mean()), kept)
        rows.append((M, float(ranks.mean()), float(ranks.mean()) / base[0], float(ranks.mean()) / k, kept / base[1]))
    return rows


if __name__ == "__main__":
    E = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    R = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    torch.manual_seed(0)
    d = 64
    spec = {"name": "bias_balanced", "init_std": 0.1}
    ref = build_router({**spec, "k": k, "expert_groups": R}, d, E)
    state = ref.state_dict()
    x = torch.randn(8192, d)
    print(f"E={E} experts on R={R} ranks ({E // R} per rank), top-{k}, 8192 tokens x ~ N(0, I), d={d}, sigmoid gate N(0, 0.1^2)")
    print("| top_groups M | distinct ranks / token | vs unlimited | vs once-per-slot (k) | routing score kept |")
    print("|--:|--:|--:|--:|--:|")
    for M, ranks, rel, per_slot, kept in measure(spec, x, E, k, R):
        print(f"| {M if M < R else 'all'} | {ranks:.2f} | {rel:.2f} | {per_slot:.2f} | {kept:.3f} |")
