"""`train.compile`: torch.compile of the model where it pays (small models are launch-bound on a GPU).

  dense  every submodule that holds no MoE layer (attention, norms, dense FFNs, embeddings, head) and
         every router, compiled as the largest such modules: their ~25 small ops per block become a few
         fused kernels
  moe    dense, and each MoE layer whole (route, plan, permute, experts, combine; its routing statistics
         function too): the static-shape dropless path has no host sync, so it compiles to one graph
  off    eager
  auto   off, for now. Measured on one H200 (2026-12-02, docs/benchmarks.md, issue 19): `moe` made the E=64, k=6
         preset 3.2x SLOWER (69k vs 221k tokens/s): the preset router's balance loss broke the graph at a
         data-dependent mask and dynamo recompiled the resumed frame every step until its limit. That break
         (and the router's two host syncs) is gone since, yet it measured 85k vs 285k eager after that fix; two
         more causes were removed afterwards without a GPU to measure them (a graph break in the SwiGLU
         backward's fallback, the device-capability query), so auto does not switch it on. The layer alone compiled (softmax_topk, no balance loss) ran 1.2x / 1.7x / 1.1x /
         0.98x eager at issue 19's four shapes.

Modules are compiled in place (`nn.Module.compile`), so parameter names, state dicts and checkpoints are
unchanged. A part that cannot be compiled runs eagerly (dynamo's graph breaks, and errors suppressed):
compilation changes speed, never whether a run works.
"""
from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("auto", "off", "dense", "moe")


def resolve_compile(mode: str, device: torch.device) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "off"  # see the module docstring: not on by default until the trainer is re-measured compiled
    return mode


def _holds_moe(module: nn.Module, moe_type: type) -> bool:
    return any(isinstance(m, moe_type) for m in module.modules())


def compile_model(model: nn.Module, mode: str, backend: str = "inductor") -> list[str]:
    """Compile the parts of `model` that `mode` names (in place); returns the compiled modules' names."""
    from routerlab.moe.layer import MoELayer

    if mode == "off":
        return []
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a part that fails to compile runs eagerly
    from routerlab.moe.kernels import cuda_capability

    for device in {p.device for p in model.parameters() if p.is_cuda}:  # read outside the graph (auto backend's choice)
        cuda_capability(device)
    # one compiled graph serves every block of the same shape; leave room for train/eval and several shapes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, MoELayer):
            if mode == "moe":
                module.compile(backend=backend)
                compiled.append(prefix)
                from routerlab.moe.stats import stats_from_routing

                module.stats_fn = torch.compile(stats_from_routing, backend=backend)
            else:
                module.router.compile(backend=backend)
                compiled.append(f"{prefix}.router")
            return
        container = isinstance(module, (nn.ModuleList, nn.ModuleDict))  # never called: compile what they hold
        if not container and not _holds_moe(module, MoELayer) and any(True for _ in module.parameters()):
            module.compile(backend=backend)
            compiled.append(prefix)
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    for name, child in model.named_children():
        visit(name, child)
    return compiled


def set_tf32(enabled: bool) -> None:
    """float32 matmuls and convolutions on CUDA in TF32 (enabled) or full fp32."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
