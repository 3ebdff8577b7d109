"""routerlab's AdamW (routerlab/adamw.py): on CUDA its step is a Triton kernel that must do what torch's fused
AdamW does (weight decay, bias corrections, grad_scale as a divisor, found_inf skipping the update and the step
count). Here it runs under Triton's interpreter (a subprocess: TRITON_INTERPRET must be set before triton is
imported) against torch's own fused AdamW on the CPU, and it compiles for Hopper as the GPU would compile it."""
import os
import subprocess
import sys
import time

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is installed with the test extra on Linux only")

HYPER = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))


def test_the_kernel_matches_torchs_fused_adamw_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith("adamw ok"), done.stdout[-2000:]


def compile_for_hopper(fn, types: dict, constants: dict) -> None:
    # no GPU here, but Triton compiles to a cubin for sm_90 (H200) all the same
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {**types, **dict.fromkeys(constants, "constexpr")}
    assert sorted(types) == sorted(fn.arg_names), f"the kernel takes {fn.arg_names}"
    compiled = triton.compile(ASTSource(fn=fn, signature={k: types[k] for k in fn.arg_names}, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


TABLE = {"tensors": "*i64", "block_tensor": "*i32", "block_start": "*i64"}


@pytest.mark.parametrize("flags", [(True, True), (False, False)])
def test_the_kernel_compiles_for_hopper(flags):
    from routerlab.triton_adamw import _adamw

    types = {**TABLE, "grad_scale": "*fp32", "found_inf": "*fp32",
             **dict.fromkeys(["lr", "beta1", "beta2", "log2_beta1", "log2_beta2", "eps", "weight_decay"], "fp32")}
    compile_for_hopper(_adamw, types, {"DTYPE": triton.language.bfloat16, "HAS_SCALE": flags[0], "HAS_INF": flags[1], "BLOCK": 2048})


def test_the_norm_kernel_compiles_for_hopper():
    from routerlab.triton_adamw import _grad_sq_sums

    compile_for_hopper(_grad_sq_sums, {**TABLE, "n_blocks": "i32", "sums": "*fp32"},
                       {"DTYPE": triton.language.bfloat16, "BLOCK": 1024, "BLOCKS": 4})


def pair(dtype, device="cpu", sizes=(5, 3000, 4099)):
    """Our AdamW and torch's fused AdamW on equal copies of the same parameters."""
    from routerlab.adamw import AdamW

    torch.manual_seed(0)
    base = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
    ours = AdamW([torch.nn.Parameter(b.clone()) for b in base], **HYPER)
    theirs = torch.optim.AdamW([torch.nn.Parameter(b.clone()) for b in base], fused=True, **HYPER)
    return ours, theirs


def params(opt):
    return opt.param_groups[0]["params"]


def steps(ours, theirs, n=5, skip_at=2):
    """n steps with the same gradients; a grad_scale on odd steps, found_inf set at step skip_at."""
    for i in range(n):
        grads = [torch.randn_like(p) for p in params(ours)]
        for opt in (ours, theirs):
            for p, g in zip(params(opt), grads):
                p.grad = g.clone()
            opt.grad_scale = torch.tensor(3.0, device=grads[0].device) if i % 2 else None
            opt.found_inf = torch.tensor(float(i == skip_at), device=grads[0].device)
        before = [p.detach().clone() for p in params(ours)]
        ours.step()
        theirs.step()
        if i == skip_at:
            assert all(torch.equal(p, b) for p, b in zip(params(ours), before)), "found_inf must leave the weights"


def check_agreement(ours, theirs, rtol, atol):
    for p, q in zip(params(ours), params(theirs)):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], rtol=rtol, atol=atol)
        assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"]) == 4  # 5 steps, one skipped


def check_under_interpreter() -> None:
    from routerlab import adamw

    assert adamw.uses_triton(torch.zeros(1)), "the interpreter should route CPU float32 to the kernel"
    ours, theirs = pair(torch.float32)
    import routerlab.triton_adamw as kernel

    calls = []

    original = kernel.step
    kernel.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    steps(ours, theirs)
    kernel.step = original
    assert len(calls) == 5, f"the kernel ran {len(calls)} times, expected one launch for the 3 parameters x 5 steps"
    check_agreement(ours, theirs, rtol=2e-6, atol=2e-7)
    # parameters of two dtypes: one launch each; a parameter without a gradient is left alone
    from routerlab.adamw import AdamW

    wide, narrow, idle = (torch.nn.Parameter(torch.randn(4099, dtype=d)) for d in (torch.float32, torch.bfloat16, torch.float32))
    reference = torch.nn.Parameter(wide.detach().clone())
    mixed, alone = AdamW([wide, narrow, idle], **HYPER), torch.optim.AdamW([reference], fused=True, **HYPER)
    calls.clear()
    kernel.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    for _ in range(3):
        grad = torch.randn(4099)
        wide.grad, narrow.grad, reference.grad = grad.clone(), grad.bfloat16(), grad.clone()
        mixed.step()
        alone.step()
    kernel.step = original
    assert len(calls) == 6 and idle not in mixed.state
    torch.testing.assert_close(wide, reference, rtol=2e-6, atol=2e-7)
    # a parameter that does not start on a 16-byte boundary (a view into a buffer): torch's step for the group
    shifted = torch.nn.Parameter(torch.randn(4100)[1:])
    reference = torch.nn.Parameter(shifted.detach().clone())
    mine, alone = AdamW([shifted], **HYPER), torch.optim.AdamW([reference], fused=True, **HYPER)
    calls.clear()
    kernel.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    shifted.grad, reference.grad = (torch.ones(4099),) * 2
    mine.step()
    alone.step()
    kernel.step = original
    assert shifted.data_ptr() % 16 and not calls and torch.equal(shifted, reference)
    # bf16: the interpreter rounds to bf16 by truncation (the GPU to nearest): within one bf16 ulp of the exact step
    check_one_bf16_step(rtol=2 ** -7)
    # the state is torch's fused AdamW's: each loads the other's and both go on alike
    ours, theirs = pair(torch.float32)
    steps(ours, theirs, n=2, skip_at=-1)
    fresh_ours, fresh_theirs = pair(torch.float32)
    for src, dst in ((ours, fresh_theirs), (theirs, fresh_ours)):
        for p, q in zip(params(src), params(dst)):
            q.data.copy_(p)
        dst.load_state_dict(src.state_dict())
    steps(fresh_ours, fresh_theirs, n=3, skip_at=-1)
    for p, q in zip(params(fresh_ours), params(fresh_theirs)):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
    # float64 is not a kernel dtype: torch's own step, bit for bit
    ours, theirs = pair(torch.float64)
    steps(ours, theirs)
    assert all(torch.equal(p, q) for p, q in zip(params(ours), params(theirs)))
    check_grad_norm()
    print("adamw ok")


def check_grad_norm(device: str = "cpu") -> None:
    """AdamW.grad_norm against the norm in float64: parameters of two dtypes, sizes that end inside a block and a
    program of several blocks, one without a gradient; a non-finite gradient gives a non-finite norm; gradients
    the kernel cannot read (float64, a misaligned view) give None, for the caller to take torch's norm."""
    from routerlab.adamw import AdamW
    from routerlab.triton_adamw import BLOCK, NORM_BLOCKS

    torch.manual_seed(2)
    sizes = (5, BLOCK, 3 * BLOCK + 7, NORM_BLOCKS * BLOCK + 1, 2 * NORM_BLOCKS * BLOCK)
    ps = [torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype)) for n in sizes for dtype in (torch.float32, torch.bfloat16)]
    idle = torch.nn.Parameter(torch.randn(7, device=device))
    for p in ps:
        p.grad = torch.randn_like(p) * 3
    opt = AdamW([*ps, idle], **HYPER)
    want = torch.cat([p.grad.double().flatten() for p in ps]).norm()
    got = opt.grad_norm()
    assert got is not None and got.dtype == torch.float32 and got.device == ps[0].device
    assert abs(float(got) - float(want)) <= 1e-6 * float(want), f"norm {float(got)} against {float(want)}"
    ps[-1].grad[5 * BLOCK + 3] = float("nan")
    assert not torch.isfinite(opt.grad_norm())
    ps[-1].grad[5 * BLOCK + 3] = float("inf")
    assert not torch.isfinite(opt.grad_norm())
    wide = torch.nn.Parameter(torch.randn(9, device=device, dtype=torch.float64))
    wide.grad = torch.ones_like(wide)
    assert AdamW([wide], **HYPER).grad_norm() is None
    shifted = torch.nn.Parameter(torch.randn(4100, device=device)[1:])
    shifted.grad = torch.ones(4099, device=device)
    assert AdamW([shifted], **HYPER).grad_norm() is None


def check_one_bf16_step(rtol: float, device: str = "cpu") -> None:
    """One step of a bf16 parameter with moments already under way, against the step in float64 from the same
    values: bf16 outputs must be the exact result rounded (within rtol: 2^-8 is half an ulp or less, round to
    nearest; 2^-7 one ulp, truncation). Chained steps would compound one-ulp rounding flips, so one step."""
    from routerlab.adamw import AdamW

    torch.manual_seed(1)
    n, lr, wd, (b1, b2), eps, t, scale = 1 << 16, 1e-2, 0.1, (0.9, 0.95), 1e-8, 5, 3.0
    p0, g = (torch.randn(n, device=device).bfloat16() for _ in range(2))
    m0, v0 = (torch.randn(n, device=device) * 0.1).bfloat16(), (torch.rand(n, device=device) * 0.01).bfloat16()
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW([p], lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    opt.state[p] = {"step": torch.tensor(t - 1.0, device=device), "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()}
    p.grad, opt.grad_scale, opt.found_inf = g.clone(), torch.tensor(scale, device=device), torch.tensor(0.0, device=device)
    opt.step()
    unscaled = g.double() / scale
    m, v = m0.double() * b1 + (1 - b1) * unscaled, v0.double() * b2 + (1 - b2) * unscaled ** 2
    exact = p0.double() * (1 - lr * wd) - lr / (1 - b1 ** t) * m / (v.sqrt() / (1 - b2 ** t) ** 0.5 + eps)
    for got, want in ((p, exact), (opt.state[p]["exp_avg"], m), (opt.state[p]["exp_avg_sq"], v)):
        torch.testing.assert_close(got.detach().double(), want, rtol=rtol, atol=1e-7)
    assert float(opt.state[p]["step"]) == t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gradient_norm_on_cuda():
    check_grad_norm("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kernel_matches_torchs_fused_adamw_on_cuda():
    ours, theirs = pair(torch.float32, "cuda", sizes=(5, 3000, 1 << 20))
    steps(ours, theirs)
    check_agreement(ours, theirs, rtol=2e-6, atol=2e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_with_new_gradients_does_not_wait_for_the_gpu():
    # eagerly, backward allocates new gradients every step and the address table is remade: its copy to the GPU must
    # be queued behind the step's kernels, not wait for them (from pageable memory CUDA drains the stream first)
    from routerlab.adamw import AdamW

    ps = [torch.nn.Parameter(torch.randn(1 << 16, device="cuda")) for _ in range(8)]
    opt = AdamW(ps, **HYPER)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # compiles the kernel, makes the state and the table
    old = [p.grad for p in ps]  # kept, so that the new gradients get new addresses
    for p in ps:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued ahead of the step
    start = time.perf_counter()
    opt.step()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    assert host < 0.2, f"the step waited {host:.3f} s for the GPU"
    del old  # kept alive until the step has run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_state_saved_on_the_cpu_steps_on_cuda_as_torchs_does():
    # a run trained on the CPU and resumed on CUDA: torch's plain AdamW saved its step counts on the host
    from routerlab.adamw import AdamW

    torch.manual_seed(0)
    cpu = [torch.nn.Parameter(torch.randn(n)) for n in (5, 3000)]
    plain = torch.optim.AdamW(cpu, **HYPER)
    for _ in range(3):
        for p in cpu:
            p.grad = torch.randn_like(p)
        plain.step()
    saved = plain.state_dict()
    ours_params = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    theirs_params = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    ours, theirs = AdamW(ours_params, **HYPER), torch.optim.AdamW(theirs_params, fused=True, **HYPER)
    ours.load_state_dict(saved)
    theirs.load_state_dict(saved)
    grads = [torch.randn_like(p) for p in ours_params]
    for opt, ps in ((ours, ours_params), (theirs, theirs_params)):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(ours_params, theirs_params):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
        assert float(ours.state[p]["step"]) == 4.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_bf16_step_on_cuda_is_the_exact_step_rounded_to_nearest():
    check_one_bf16_step(rtol=2 ** -8, device="cuda")


if __name__ == "__main__":
    check_under_interpreter()
