"""The expert computations' fused pieces: SwiGLU on the fused gate|up tensor and the grouped SwiGLU FFN.

Triton kernels (triton_swiglu, triton_combine) run where routerlab/kernel_choice.py's `uses_triton` says: CUDA
tensors of bf16, fp16 or fp32 (or any CPU tensor under Triton's interpreter); float64 and the CPU take the
pure-PyTorch path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from routerlab.kernel_choice import uses_triton

grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

_CAPABILITY: dict[int, tuple[int, int]] = {}  # CUDA device index -> compute capability, read once per device


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, cached: a plain dict read on later calls (also inside torch.compile,
    where the driver query would break the graph)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def grouped_mm_supported(x: Tensor) -> bool:
    """grouped_mm needs bf16/fp16 (its fp32 backward fails on CPU) and, on CUDA, a Hopper-class GPU."""
    if grouped_mm is None or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda":
        return cuda_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


# -- SwiGLU on the fused [..., 2h] gate|up tensor ----------------------------------------------------

def swiglu_reference(h13: Tensor) -> Tensor:
    gate, up = h13.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_forward(h13: Tensor, n_rows: Tensor | None = None) -> Tensor:
    """silu(gate) * up without autograd, over the last dim of h13 (any leading dims). n_rows: [1] device
    tensor; rows at or past it are padding, skipped by the Triton kernel (outputs unspecified there)."""
    if uses_triton(h13):
        from routerlab.moe import triton_swiglu

        rows = h13.reshape(-1, h13.shape[-1])
        return triton_swiglu.forward(rows.contiguous(), n_rows).view(*h13.shape[:-1], h13.shape[-1] // 2)
    return swiglu_reference(h13)


def swiglu_backward(h13: Tensor, grad: Tensor, n_rows: Tensor | None = None) -> Tensor:
    return swiglu_backward_and_forward(h13, grad, n_rows, forward=False)[0]


def swiglu_backward_and_forward(h13: Tensor, grad: Tensor, n_rows: Tensor | None = None, forward: bool = True) -> tuple[Tensor, Tensor | None]:
    """(input gradient, silu(gate) * up or None): the Triton kernel computes both from one read of h13."""
    if uses_triton(h13):
        from routerlab.moe import triton_swiglu

        width = h13.shape[-1]
        rows = h13.reshape(-1, width).contiguous()
        out = rows.new_empty(rows.shape[0], width // 2) if forward else None
        grad_h13 = triton_swiglu.backward(rows, grad.reshape(-1, width // 2), n_rows, out)
        return grad_h13.view(h13.shape), None if out is None else out.view(*h13.shape[:-1], width // 2)
    return _swiglu_backward_torch(h13, grad), swiglu_forward(h13, n_rows) if forward else None


def _swiglu_backward_torch(h13: Tensor, grad: Tensor) -> Tensor:
    # the kernels' formula in PyTorch (fp32 math for 16-bit inputs, like the kernels): no autograd.grad inside a
    # backward, which torch.compile cannot trace
    math_dtype = torch.promote_types(h13.dtype, torch.float32)
    a, b = h13.to(math_dtype).chunk(2, dim=-1)
    g = grad.to(math_dtype)
    s = torch.sigmoid(a)
    return torch.cat([g * b * s * (1 + a * (1 - s)), g * a * s], dim=-1).to(h13.dtype)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up that saves only its input and writes the input gradient in one [..., 2h] buffer.

    Eager autograd would save gate, silu(gate) and up, and build the gradient with a copy (cat); the
    fused Triton kernels read and write each element once per direction.
    """

    @staticmethod
    def forward(ctx, h13: Tensor) -> Tensor:
        ctx.save_for_backward(h13)
        return swiglu_forward(h13)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h13,) = ctx.saved_tensors
        return swiglu_backward(h13, grad)


def swiglu(h13: Tensor) -> Tensor:
    """silu(gate) * up over the last dim, differentiable; the [E, C, 2h] tensor of `padded` included."""
    if uses_triton(h13):
        return _SwiGLU.apply(h13)
    return swiglu_reference(h13)


class GroupedSwiGLUFFN(torch.autograd.Function):
    """y = grouped_mm(swiglu(grouped_mm(x, w_in)), w_out), saving x and the [N, 2h] pre-activation only.

    The activation g = swiglu(h13) is recomputed in backward instead of kept (eager autograd would keep it too,
    N*h more elements: issue 10's memory bound, docs/benchmarks.md); on the GPU by the SwiGLU backward kernel,
    which reads h13 for the input gradient anyway.
    Rows past offs[-1] are padding: grouped_mm leaves them alone and so do the SwiGLU kernels.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, offs: Tensor) -> Tensor:
        h13 = grouped_mm(x, w_in, offs=offs)
        ctx.save_for_backward(x, w_in, w_out, offs, h13)
        return grouped_mm(swiglu_forward(h13, offs[-1:]), w_out, offs=offs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w_in, w_out, offs, h13 = ctx.saved_tensors
        grad = grad.contiguous()
        grad_h13, g = swiglu_backward_and_forward(h13, grouped_mm(grad, w_out.mT, offs=offs), offs[-1:])
        grad_w_out = grouped_mm(g.mT, grad, offs=offs)
        grad_x = grouped_mm(grad_h13, w_in.mT, offs=offs)
        grad_w_in = grouped_mm(x.mT, grad_h13, offs=offs)
        return grad_x, grad_w_in, grad_w_out, None
