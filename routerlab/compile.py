"""`train.compile`: torch.compile of the model where it pays (small models are launch-bound on a GPU).

  dense  every submodule that holds no MoE layer (attention, norms, dense FFNs, embeddings, head) and
         every router, compiled as the largest such modules: their ~25 small ops per block become a few
         fused kernels
  moe    dense, and each MoE layer whole (route, plan, permute, experts, combine; its routing statistics
         function too): the static-shape dropless path has no host sync, so it compiles to one graph
  off    eager
  auto   moe on CUDA, off on CPU (CPU numbers stay exactly those of the eager model)

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
        return "moe" if device.type == "cuda" else "off"
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
        if not _holds_moe(module, MoELayer) and any(True for _ in module.parameters()):
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
