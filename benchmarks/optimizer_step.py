"""Issue 19: the optimizer step of the E=64, k=6 preset (840M parameters) on one GPU, side by side in one run.

    python3 benchmarks/optimizer_step.py [--preset configs/gpu/stdlib-110m-e64k6.yaml] [--dtype bfloat16]

Rows: the ideal (a plain copy moving the bytes AdamW must move: read parameter, gradient and both moments, write
parameter and moments), torch's fused AdamW as the trainer called it before (clip as grad_scale, found_inf), the same
without grad_scale, routerlab's Triton AdamW (routerlab/adamw.py) with both and at other block sizes, and the gradient norm the clip needs
(torch's foreach norm, AdamW.grad_norm's kernel, and their ideal: a copy moving the gradients' bytes; v9).
Then agreement: two steps of each from the preset's initial weights and fresh state, parameters compared (bitwise share, max difference).
"""
from __future__ import annotations

import argparse
import json

import torch

from routerlab import triton_adamw
from routerlab.adamw import AdamW
from routerlab.bench.core import time_cuda
from routerlab.config import load_config
from routerlab.models import build_model
from routerlab.tasks import build_task


def preset_params(path: str, dtype: torch.dtype) -> list[torch.Tensor]:
    config = load_config(path, ["train.device=cuda"])
    torch.manual_seed(0)
    model = build_model(config.model, config.router, build_task(config.task)).to("cuda", dtype)
    params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def optimizer(kind: str, params, scale: bool, lr: float = 1e-4):
    opt = AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.95)) if kind == "triton" else \
        torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    opt.grad_scale = torch.tensor(1.5, device="cuda") if scale else None
    opt.found_inf = torch.zeros((), device="cuda")
    return opt


def copy_ms(moved: int, iters: int) -> float:
    """A device-to-device copy that reads moved / 2 bytes and writes moved / 2."""
    src = torch.empty(moved // 4, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), iters)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="configs/gpu/stdlib-110m-e64k6.yaml")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    params = preset_params(args.preset, dtype)
    # the agreement check starts from these: the timed steps move the weights, and torch's fused step with grad_scale
    # writes each gradient back divided (after a few hundred steps, bf16 gradients underflow to zero)
    initial = [(p.detach().clone(), p.grad.clone()) for p in params]
    n = sum(p.numel() for p in params)
    size = torch.empty((), dtype=dtype).element_size()
    moved = n * size * 7  # read p, g, m, v; write p, m, v
    rows = {"ideal: copy of the same bytes": copy_ms(moved, args.iters)}
    for kind in ("torch", "triton"):
        for scale in (True, False):
            opt = optimizer(kind, params, scale)
            opt.step()  # state made outside the timing
            rows[f"{kind} AdamW, grad_scale {'set' if scale else 'None'}"] = time_cuda(opt.step, args.iters)
            del opt
            torch.cuda.empty_cache()
    default = triton_adamw.BLOCK, triton_adamw.NUM_WARPS
    for block, warps in [(512, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]:  # the default's neighbours
        triton_adamw.BLOCK, triton_adamw.NUM_WARPS = block, warps
        opt = optimizer("triton", params, True)
        opt.step()
        rows[f"triton AdamW, grad_scale set, BLOCK {block}, {warps} warps"] = time_cuda(opt.step, args.iters)
        del opt
    triton_adamw.BLOCK, triton_adamw.NUM_WARPS = default
    grads = [p.grad for p in params]
    rows["gradient norm (get_total_norm, foreach)"] = time_cuda(lambda: torch.nn.utils.get_total_norm(grads, foreach=True), args.iters)
    norm_opt = optimizer("triton", params, True)
    rows["gradient norm (AdamW.grad_norm, Triton)"] = time_cuda(norm_opt.grad_norm, args.iters)
    rows["gradient norm's ideal: copy of the gradients' bytes"] = copy_ms(n * size, args.iters)
    exact = float(torch.stack([g.double().norm() for g in grads]).norm())
    norms = {"float64": exact, "foreach (bf16 for bf16 gradients)": float(torch.nn.utils.get_total_norm(grads, foreach=True)),
             "AdamW.grad_norm": float(norm_opt.grad_norm())}
    del norm_opt
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parameters": n, "dtype": args.dtype,
              "GB moved by AdamW": moved / 1e9, "ms": rows, "gradient norms": norms,
              "TB/s at AdamW's bytes": {k: moved / (v * 1e-3) / 1e12 for k, v in rows.items() if "norm" not in k}}
    # agreement: two steps from the same (initial) weights and fresh state, triton against torch; lr 1e-2 so that
    # the updates move bf16 weights (at 1e-4, 0.003% of them change)
    base = [weight for weight, _ in initial]
    after = {}
    for kind in ("torch", "triton"):
        for p, (weight, _) in zip(params, initial):
            p.data.copy_(weight)
        opt = optimizer(kind, params, True, lr=1e-2)
        for _ in range(2):  # the same gradients each step (torch's step leaves them divided by grad_scale)
            for p, (_, grad) in zip(params, initial):
                p.grad.copy_(grad)
            opt.step()
        after[kind] = [p.detach().clone() for p in params]
        del opt
    same = sum(int((a == b).sum()) for a, b in zip(after["torch"], after["triton"]))
    report["agreement after 2 steps"] = {"bitwise equal share": same / n,
                                         "max abs difference": max(float((a.float() - b.float()).abs().max()) for a, b in zip(after["torch"], after["triton"])),
                                         "max relative difference (bf16's rounding: 2^-8 = 3.9e-3)": max(float(((a.float() - b.float()).abs() / a.float().abs().clamp_min(1e-30)).max()) for a, b in zip(after["torch"], after["triton"])),
                                         "changed share (torch)": sum(int((a != b).sum()) for a, b in zip(after["torch"], base)) / n,
                                         "max abs update (torch)": max(float((a.float() - b.float()).abs().max()) for a, b in zip(after["torch"], base))}
    print(json.dumps(report, indent=1))
    print(f"| {report['device']}, {n / 1e6:.0f}M parameters, {args.dtype} | ms | x ideal |\n|---|--:|--:|")
    ideal, norm_ideal = rows["ideal: copy of the same bytes"], rows["gradient norm's ideal: copy of the gradients' bytes"]
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} | {(norm_ideal if 'norm' in k else ideal) / v:.2f} |")


if __name__ == "__main__":
    main()
