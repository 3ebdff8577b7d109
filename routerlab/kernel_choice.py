"""Where the Triton kernels run: one decision for every kernel of the core (routers, moe) and the optimizer.

Triton kernels serve CUDA tensors of the dtypes they compute exactly (bf16, fp16, fp32: fp32 math inside);
anything else (CPU, float64) takes the PyTorch path, so float64 stays float64. Under Triton's interpreter
(TRITON_INTERPRET=1, set before the process starts) CPU tensors take the kernels too: the tests run the GPU
path that way on a machine without a GPU.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the kernels accumulate in fp32: no float64

_TRITON: bool | None = None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = True
        except ImportError:
            _TRITON = False
    return _TRITON


def triton_device(t: Tensor) -> bool:
    """Whether Triton kernels can run on t's device: CUDA (or the interpreter), Triton there. For index tensors; the
    kernels that compute values take uses_triton."""
    return (t.is_cuda or _INTERPRET) and triton_available()


def uses_triton(t: Tensor) -> bool:
    """Whether the core runs its Triton kernels on t: CUDA (or the interpreter), Triton there, a kernel dtype."""
    return t.dtype in KERNEL_DTYPES and triton_device(t)
