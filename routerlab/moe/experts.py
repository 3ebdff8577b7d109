"""ExpertBank: all experts' weights stacked, so one grouped matmul serves them all.

Weights: `w_in` [E, d, 2h] (SwiGLU: gate columns [:h], up columns [h:]) or [E, d, h] (GELU), and
`w_out` [E, h, d]. Gate and up share one matrix so the first expert GEMM is one wide product.

Input rows arrive sorted by expert: `counts[e]` rows for expert e, then possibly padding rows (slots
that were dropped or unused) at the end. Padding rows' values and outputs are unspecified (the GPU
permute leaves them unset, NaN included): no result depends on rows past counts.sum() (see layer.combine). Backends:
  loop     one matmul per expert (the reference: always correct, any device and dtype)
  grouped  torch grouped matmul over the sorted rows (CUDA sm90+ bf16/fp16; CPU bf16/fp16); no host sync
  padded   rows scattered into an [E, C, d] buffer, C = largest count, then batched matmul
Every backend equals `loop` forward and backward (tests/test_moe_core.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("auto", "loop", "grouped", "padded")
ACTIVATIONS = ("swiglu", "gelu")

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

def grouped_mm_supported(x: Tensor) -> bool:
    """grouped_mm needs bf16/fp16 (its fp32 backward fails on CPU) and, on CUDA, a Hopper-class GPU."""
    if _grouped_mm is None or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


def choose_backend(backend: str, x: Tensor) -> str:
    """auto: grouped matmul where it runs; else the per-expert loop, which beat `padded` in every run of
    `routerlab bench` on an idle 2-core CPU (fp32; docs/benchmarks.md)."""
    if backend != "auto":
        return backend
    if grouped_mm_supported(x):
        return "grouped"
    return "loop"


# -- SwiGLU on the fused [N, 2h] gate|up tensor ------------------------------------------------------

def swiglu_reference(h13: Tensor) -> Tensor:
    gate, up = h13.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up that saves only its input and writes the input gradient in one [N, 2h] buffer.

    Eager autograd would save gate, silu(gate) and up, and build the gradient with a copy (cat); the
    fused Triton kernels (CUDA) read and write each element once per direction.
    """

    @staticmethod
    def forward(ctx, h13: Tensor) -> Tensor:
        ctx.save_for_backward(h13)
        from routerlab.moe import triton_swiglu

        return triton_swiglu.forward(h13)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h13,) = ctx.saved_tensors
        from routerlab.moe import triton_swiglu

        return triton_swiglu.backward(h13, grad)


def swiglu_forward(h13: Tensor, n_rows: Tensor | None = None) -> Tensor:
    """silu(gate) * up without autograd (Triton on CUDA). n_rows: [1] device tensor; rows at or past it
    are padding, skipped by the Triton kernel (outputs unspecified there)."""
    if h13.is_cuda and _triton_available():
        from routerlab.moe import triton_swiglu

        return triton_swiglu.forward(h13.contiguous(), n_rows)
    return swiglu_reference(h13)


def swiglu_backward(h13: Tensor, grad: Tensor, n_rows: Tensor | None = None) -> Tensor:
    if h13.is_cuda and _triton_available():
        from routerlab.moe import triton_swiglu

        return triton_swiglu.backward(h13.contiguous(), grad, n_rows)
    with torch.enable_grad():
        h = h13.detach().requires_grad_(True)
        return torch.autograd.grad(swiglu_reference(h), h, grad)[0]


class _GroupedSwiGLUFFN(torch.autograd.Function):
    """y = grouped_mm(swiglu(grouped_mm(x, w_in)), w_out), saving x and the [N, 2h] pre-activation only.

    The activation g = swiglu(h13) is recomputed in backward (one elementwise pass) instead of kept:
    eager autograd would keep it too, N*h more elements (issue 10's memory bound, docs/benchmarks.md).
    Rows past offs[-1] are padding: grouped_mm leaves them alone and so do the SwiGLU kernels.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, offs: Tensor) -> Tensor:
        h13 = _grouped_mm(x, w_in, offs=offs)
        ctx.save_for_backward(x, w_in, w_out, offs, h13)
        return _grouped_mm(swiglu_forward(h13, offs[-1:]), w_out, offs=offs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w_in, w_out, offs, h13 = ctx.saved_tensors
        grad = grad.contiguous()
        g = swiglu_forward(h13, offs[-1:])
        grad_w_out = _grouped_mm(g.mT, grad, offs=offs)
        grad_h13 = swiglu_backward(h13, _grouped_mm(grad, w_out.mT, offs=offs), offs[-1:])
        grad_x = _grouped_mm(grad_h13, w_in.mT, offs=offs)
        grad_w_in = _grouped_mm(x.mT, grad_h13, offs=offs)
        return grad_x, grad_w_in, grad_w_out, None


def swiglu(h13: Tensor) -> Tensor:
    if h13.is_cuda and h13.is_contiguous() and _triton_available():
        return _SwiGLU.apply(h13)
    return swiglu_reference(h13)


_TRITON: bool | None = None


def _triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = True
        except ImportError:
            _TRITON = False
    return _TRITON


# -- the experts ---------------------------------------------------------------------------------------

class ExpertBank(nn.Module):
    """E feed-forward experts (SwiGLU or GELU) with stacked weights."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.d_model, self.hidden, self.activation = num_experts, d_model, hidden, activation
        width = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.randn(num_experts, d_model, width) / math.sqrt(d_model))
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, d_model) / math.sqrt(hidden))

    def act(self, h: Tensor) -> Tensor:
        return swiglu(h) if self.activation == "swiglu" else F.gelu(h)

    def forward(self, x: Tensor, counts: Tensor, backend: str = "auto") -> Tensor:
        """x: [N, d] rows sorted by expert (padding rows last); counts: int [E] rows per expert."""
        backend = choose_backend(backend, x)
        if backend == "loop":
            return self.loop(x, counts)
        if backend == "grouped":
            return self.grouped(x, counts)
        if backend == "padded":
            return self.padded(x, counts)
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")

    def _pad_rows(self, y: Tensor, rows: int) -> Tensor:
        return y if y.shape[0] == rows else torch.cat([y, y.new_zeros(rows - y.shape[0], y.shape[1])])

    def loop(self, x: Tensor, counts: Tensor) -> Tensor:
        sizes = counts.tolist()
        # unbind, not w[e]: indexing would give every expert its own full-size gradient buffer
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        outs = []
        for e, rows in enumerate(x[: sum(sizes)].split(sizes)):
            if rows.shape[0]:
                outs.append(self.act(rows @ w_in[e]) @ w_out[e])
        y = torch.cat(outs) if outs else x.new_zeros(0, self.d_model)
        return self._pad_rows(y, x.shape[0])

    def grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        if not grouped_mm_supported(x):
            raise ValueError(f"backend 'grouped' needs bf16/fp16 on CPU or a CUDA GPU of compute capability >= 9; got {x.dtype} on {x.device}")
        offs = counts.cumsum(0).to(torch.int32)
        if self.activation == "swiglu":
            return _GroupedSwiGLUFFN.apply(x, self.w_in, self.w_out, offs)
        return _grouped_mm(self.act(_grouped_mm(x, self.w_in, offs=offs)), self.w_out, offs=offs)

    def padded(self, x: Tensor, counts: Tensor) -> Tensor:
        E = self.num_experts
        capacity = int(counts.max()) if x.shape[0] else 0
        kept = int(counts.sum())
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=kept)
        starts = counts.cumsum(0) - counts
        slot = expert_of_row * capacity + torch.arange(kept, device=x.device) - starts[expert_of_row]
        buf = x.new_zeros(E * capacity, x.shape[1]).index_copy(0, slot, x[:kept]).view(E, capacity, -1)
        y = torch.bmm(self.act(torch.bmm(buf, self.w_in)), self.w_out)
        return self._pad_rows(y.reshape(E * capacity, -1)[slot], x.shape[0])
