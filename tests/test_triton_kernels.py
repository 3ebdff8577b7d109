"""The Triton kernels of the GPU path (SwiGLU, permute gather, combine and its backward) on a CPU machine:
each compiles for Hopper (sm_90, the H200), and each matches its PyTorch reference when run by Triton's
interpreter (TRITON_INTERPRET=1, in a subprocess: it must be set before triton is imported). Padding rows
hold NaN, so a kernel that reads one fails the check; few programs are launched, so the kernels' row loops
run several rounds."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is installed with the test extra on Linux only")


def test_kernels_match_the_torch_references_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith("kernels ok"), done.stdout[-2000:]


# every kernel's arguments as the GPU path passes them: pointers (*dtype), ints (i32), compile-time constants
KERNEL_ARGS = {
    ("triton_swiglu", "_fwd"): {"h13": "*bf16", "out": "*bf16", "n_rows": "*i32", "rows": "i32", "hidden": "i32"},
    ("triton_swiglu", "_bwd"): {"h13": "*bf16", "grad": "*bf16", "grad_h13": "*bf16", "n_rows": "*i32", "rows": "i32", "hidden": "i32"},
    ("triton_combine", "_gather_rows"): {"x": "*bf16", "token_of_row": "*i64", "n_kept": "*i64", "out": "*bf16", "d": "i32"},
    ("triton_combine", "_gather_reduce"): {"src": "*bf16", "inv": "*i64", "n_kept": "*i64", "w": "*fp32", "out": "*bf16", "T": "i32", "d": "i32", "k": "i32"},
    ("triton_combine", "_combine_grads"): {"y": "*bf16", "grad": "*bf16", "inv": "*i64", "n_kept": "*i64", "w": "*fp32", "grad_y": "*bf16",
                                           "grad_w": "*fp32", "T": "i32", "d": "i32", "k": "i32"},
}
FLAGS = ("HAS_LIMIT", "HAS_W")  # each kernel with one of these compiles in both forms


def compile_cases():
    import importlib

    for (module, kernel), arg_types in KERNEL_ARGS.items():
        fn = getattr(importlib.import_module(f"routerlab.moe.{module}"), kernel)
        flags = [name for name in fn.arg_names if name in FLAGS]
        for on in ([True, False] if flags else [True]):
            yield pytest.param(fn, arg_types, {"BLOCK": 1024, **dict.fromkeys(flags, on)}, id=f"{kernel}-{flags[0]}={on}" if flags else kernel)


@pytest.mark.parametrize("fn, arg_types, constants", compile_cases())
def test_kernel_compiles_for_hopper(fn, arg_types, constants):
    # no GPU here, but Triton compiles to a cubin for sm_90 (H200) all the same: a kernel that would fail
    # to compile on the GPU machine fails here
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {**arg_types, **dict.fromkeys(constants, "constexpr")}
    assert sorted(types) == sorted(fn.arg_names), f"KERNEL_ARGS is out of date: the kernel takes {fn.arg_names}"
    signature = {name: types[name] for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


def check_kernels() -> None:
    from routerlab.moe import triton_combine, triton_swiglu
    from routerlab.moe.kernels import swiglu_reference
    from routerlab.moe.layer import plan_dispatch

    triton_swiglu.PROGRAMS = triton_combine.ROW_PROGRAMS = 3
    torch.manual_seed(0)

    def close(got, want, what):
        assert torch.isfinite(got).all(), f"{what}: non-finite values (a padding row was read)"
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"{what}: max error {float((got - want).abs().max())}"

    # SwiGLU: rows at or past n_rows are padding (NaN here) and must be neither read nor needed
    rows, real, hidden = 11, 7, 40
    h13 = torch.randn(rows, 2 * hidden)
    h13[real:] = float("nan")
    grad = torch.randn(rows, hidden)
    n_rows = torch.tensor([real], dtype=torch.int32)
    want = swiglu_reference(h13[:real])
    close(triton_swiglu.forward(h13, n_rows)[:real], want, "swiglu forward")
    leaf = h13[:real].clone().requires_grad_(True)
    want_grad = torch.autograd.grad(swiglu_reference(leaf), leaf, grad[:real])[0]
    close(triton_swiglu.backward(h13, grad, n_rows)[:real], want_grad, "swiglu backward")
    close(triton_swiglu.forward(h13[:real].contiguous()), want, "swiglu forward, every row real")

    # a plan with unused slots (-1) and capacity drops: padding rows at the end
    T, k, d, E = 13, 3, 24, 4
    experts = torch.randint(-1, E, (T, k))
    plan = plan_dispatch(experts, E, capacity=5)
    n = int(plan.n_kept)
    assert 0 < n < T * k, "the plan must have real and padding rows"
    x = torch.randn(T, d)
    close(triton_combine.gather_rows(x, plan.token_of_row, plan.n_kept)[:n], x[plan.token_of_row[:n]], "permute gather")

    y = torch.randn(T * k, d)
    y[n:] = float("nan")
    weights = torch.rand(T, k)
    kept = plan.kept.view(k, T)
    slot_rows = torch.where(kept[..., None], y[plan.inv.clamp(max=n - 1)].view(k, T, d), 0)
    close(triton_combine.gather_reduce(y, plan.inv, plan.n_kept, weights, T, k),
          (slot_rows * weights.t()[..., None]).sum(0), "combine forward")
    close(triton_combine.gather_reduce(y, plan.inv, plan.n_kept, None, T, k), slot_rows.sum(0), "sum of slots")

    grad_out = torch.randn(T, d)
    grad_y, grad_w = triton_combine.combine_grads(y, grad_out, plan.inv, plan.n_kept, weights, T, k)
    slot_w = torch.where(kept, weights.t(), 0).reshape(-1)
    want_grad_y = grad_out[plan.order % T] * slot_w[plan.order][:, None]
    close(grad_y[:n], want_grad_y[:n], "combine backward, rows")
    close(grad_w, (slot_rows * grad_out).sum(-1).t(), "combine backward, weights")
    check_layer_dtypes_and_backends()
    print("kernels ok")


def check_layer_dtypes_and_backends() -> None:
    """The whole GPU path of the layer (Triton kernels, here interpreted) for every backend and dtype the CPU
    path accepts, against plain per-expert PyTorch in float64. Caught: `padded` handing the 3-D [E, C, 2h]
    tensor to the SwiGLU kernel (ValueError), and float64 computed in float32 by the SwiGLU and combine kernels."""
    import torch.nn.functional as F

    from routerlab.moe import ExpertBank, MoELayer
    from routerlab.moe.kernels import uses_triton
    from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

    assert uses_triton(torch.zeros(1)) and not uses_triton(torch.zeros(1, dtype=torch.float64))
    T, d, h, E, k = 19, 16, 24, 4, 2
    for dtype, backend, tol in [(torch.float32, "padded", 1e-5), (torch.float32, "loop", 1e-5), (torch.float64, "padded", 1e-12), (torch.float64, "loop", 1e-12)]:
        torch.manual_seed(3)
        layer = MoELayer(SoftmaxTopK(d, E, SoftmaxTopKParams(k=k)), ExpertBank(E, d, h), None, backend).to(dtype)
        x = torch.randn(T, d, dtype=dtype, requires_grad=True)
        g = torch.randn(T, d, dtype=dtype)
        out = layer(x)
        grads = torch.autograd.grad((out * g).sum(), [x, layer.experts.w_in, layer.experts.w_out])
        # reference: float64, one token at a time, its experts by hand
        xr = x.detach().double().requires_grad_(True)
        w_in, w_out = (w.detach().double().requires_grad_(True) for w in (layer.experts.w_in, layer.experts.w_out))
        routing = layer.router(xr.to(dtype))  # the router's own gradient path (float64 when dtype is)
        ref = []
        for t in range(T):
            acc = 0
            for j in range(k):
                e = int(routing.experts[t, j])
                a, b = (xr[t] @ w_in[e]).chunk(2)
                acc = acc + routing.weights[t, j].double() * ((F.silu(a) * b) @ w_out[e])
            ref.append(acc)
        ref = torch.stack(ref)
        ref_grads = torch.autograd.grad((ref * g.double()).sum(), [xr, w_in, w_out])
        for what, got, want in [("out", out, ref), *zip(("grad x", "grad w_in", "grad w_out"), grads, ref_grads)]:
            assert got.dtype == dtype, f"{backend} {dtype} {what}: computed in {got.dtype}"
            err = float((got.double() - want).norm() / want.norm())
            assert err < tol, f"{backend} {dtype} {what}: relative error {err:.2e} >= {tol:.0e}"


if __name__ == "__main__":
    check_kernels()
