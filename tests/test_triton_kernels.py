"""The Triton kernels of the GPU path (SwiGLU, permute gather, combine and its backward, the dispatch plan's counting
sort, the routing statistics, the router's softmax + top-k with its aux losses, the float32 gate) on a CPU machine:
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
    ("moe.triton_swiglu", "_fwd"): {"h13": "*bf16", "out": "*bf16", "n_rows": "*i32", "rows": "i32", "hidden": "i32"},
    ("moe.triton_swiglu", "_bwd"): {"h13": "*bf16", "grad": "*bf16", "grad_h13": "*bf16", "out": "*bf16", "n_rows": "*i32", "rows": "i32", "hidden": "i32"},
    ("moe.triton_combine", "_gather_rows"): {"x": "*bf16", "token_of_row": "*i64", "n_kept": "*i64", "out": "*bf16", "d": "i32"},
    ("moe.triton_combine", "_gather_reduce"): {"src": "*bf16", "inv": "*i64", "n_kept": "*i64", "w": "*fp32", "out": "*bf16", "T": "i32", "d": "i32", "k": "i32"},
    ("moe.triton_combine", "_combine_grads"): {"y": "*bf16", "grad": "*bf16", "inv": "*i64", "n_kept": "*i64", "w": "*fp32", "grad_y": "*bf16",
                                               "grad_w": "*fp32", "T": "i32", "d": "i32", "k": "i32"},
    ("moe.triton_plan", "_plan_histogram"): {"experts": "*i64", "hist": "*i32", "T": "i32", "k": "i32", "n_slots": "i32", "E": "i32"},
    ("moe.triton_plan", "_plan_offsets"): {"hist": "*i32", "shift": "*i32", "counts": "*i64", "n_kept": "*i64", "chunks": "i32", "E": "i32"},
    ("moe.triton_plan", "_plan_place"): {"experts": "*i64", "shift": "*i32", "order": "*i64", "inv": "*i64", "kept": "*i1", "T": "i32",
                                         "k": "i32", "n_slots": "i32", "E": "i32"},
    ("moe.triton_stats", "_stats_partials"): {"experts": "*i64", "kept": "*i1", "logits": "*fp32", "partials": "*fp32", "T": "i32", "E": "i32"},
    ("moe.triton_stats", "_stats_finish"): {"partials": "*fp32", "programs": "i32", "sequence_programs": "i32", "sequences": "i32", "T": "i32",
                                            "E": "i32", "out": "*fp32"},
    ("routers.triton_topk", "_topk_softmax"): {"logits": "*fp32", "probs": "*fp32", "lse": "*fp32", "experts": "*i64", "weights": "*fp32",
                                               "partials": "*fp32", "T": "i32", "E": "i32"},
    ("routers.triton_topk", "_router_losses"): {"partials": "*fp32", "programs": "i32", "T": "i32", "E": "i32", "balance_coef": "fp32",
                                                "z_coef": "fp32", "losses": "*fp32", "grad_p": "*fp32"},
    ("routers.triton_topk", "_topk_softmax_grad"): {"probs": "*fp32", "grad_probs": "*fp32", "grad_lse": "*fp32", "experts": "*i64",
                                                    "weights": "*fp32", "grad_weights": "*fp32", "grad_logits": "*fp32", "lse": "*fp32",
                                                    "grad_balance": "*fp32", "grad_z": "*fp32", "grad_p": "*fp32", "z_scale": "fp32",
                                                    "T": "i32", "E": "i32"},
    ("routers.triton_gate", "_gate_logits"): {"x": "*bf16", "w": "*bf16", "logits": "*fp32", "T": "i32", "D": "i32", "E": "i32"},
    ("routers.triton_gate", "_split_hi_lo"): {"g": "*fp32", "g2": "*bf16", "T": "i32", "E": "i32"},
    ("routers.triton_gate", "_gate_input_grad"): {"g2": "*bf16", "w2": "*bf16", "grad_x": "*bf16", "T": "i32", "D": "i32", "E2": "i32"},
    ("routers.triton_gate", "_gate_weight_grad"): {"g2": "*bf16", "x": "*bf16", "parts": "*fp32", "T": "i32", "D": "i32", "E2": "i32",
                                                   "rows_per_program": "i32"},
}
FLAGS = ("HAS_LIMIT", "HAS_OUT", "HAS_W", "RENORM", "LOSSES", "HAS_GB")  # each kernel with one of these compiles in both forms
CONSTANTS = {"moe.triton_stats": {"K": 6, "BLOCK_T": 64, "BLOCK_E": 64, "BLOCK_P": 64},
             "moe.triton_plan": {"C": 1024, "EB": 128, "NCH": 128},  # the preset's plan: 98,304 slots, 64 experts
             "routers.triton_topk": {"K": 6, "KP": 8, "BLOCK_T": 64, "BLOCK_E": 64, "BLOCK_P": 64, "HAS_GP": True, "HAS_GL": True,
                                       "HAS_GW": True, "HAS_GZ": True},
             "routers.triton_gate": {"BLOCK_T": 64, "BLOCK_E": 128, "BLOCK_D": 128, "UPCAST": False}}  # the preset's 2E = 128


def compile_cases():
    import importlib

    for (module, kernel), arg_types in KERNEL_ARGS.items():
        fn = getattr(importlib.import_module(f"routerlab.{module}"), kernel)
        flags = [name for name in fn.arg_names if name in FLAGS]
        constants = {name: value for name, value in {"BLOCK": 1024, **CONSTANTS.get(module, {})}.items() if name in fn.arg_names}
        for on in ([True, False] if flags else [True]):
            yield pytest.param(fn, arg_types, {**constants, **dict.fromkeys(flags, on)}, id=f"{module}.{kernel}-{flags[0]}={on}" if flags else f"{module}.{kernel}")


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
    out = torch.full((rows, hidden), float("nan"))
    close(triton_swiglu.backward(h13, grad, n_rows, out)[:real], want_grad, "swiglu backward, forward written too")
    assert torch.equal(out[:real], triton_swiglu.forward(h13, n_rows)[:real]), "the backward's forward output differs from the forward's"
    close(triton_swiglu.forward(h13[:real].contiguous()), want, "swiglu forward, every row real")

    # plans with unused slots (-1) and capacity drops: padding rows at the end; k = 3, k = 1, and rows wider than
    # one column block (1100 columns: two blocks of 1024, the second partial)
    for T, k, d, E, capacity in [(13, 3, 24, 4, 5), (9, 1, 24, 3, 2), (9, 3, 1100, 3, 4)]:
        check_gathers(triton_combine, close, T, k, d, E, capacity)
    check_plan()
    check_stats()
    check_topk_softmax()
    check_fp32_gate()
    check_layer_dtypes_and_backends()
    print("kernels ok")


def check_gathers(triton_combine, close, T, k, d, E, capacity) -> None:
    from routerlab.moe.layer import plan_dispatch

    experts = torch.randint(-1, E, (T, k))
    plan = plan_dispatch(experts, E, capacity=capacity)
    n = int(plan.n_kept)
    assert 0 < n < T * k, f"the plan (T={T}, k={k}) must have real and padding rows"
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


def check_plan(device: str = "cpu", cases=((5, 1, 3), (700, 3, 64), (1000, 2, 126), (40, 4, 6))) -> None:
    """The dropless plan's counting sort (moe/triton_plan.py) against PyTorch's stable sort (layer.plan_dispatch without
    the kernels): the same order, inverse, kept slots, counts and n_kept, element for element; unused slots (-1) among
    them, a token with none used, plans of one and of several chunks (2,000 slots: three of 1,024), 126 experts (the
    most a bucket table of 128 holds beside the unused and the past-the-end keys)."""
    from routerlab.moe import layer

    for T, k, E in cases:
        experts = torch.randint(-1, E, (T, k), device=device)
        experts[0] = -1
        got = layer.plan_dispatch(experts, E, None)
        uses = layer.triton_device
        layer.triton_device = lambda t: False
        try:
            want = layer.plan_dispatch(experts, E, None)
        finally:
            layer.triton_device = uses
        for field in ("order", "inv", "kept", "counts", "n_kept"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and torch.equal(a, b), f"plan T={T} k={k} E={E}: {field} differs"


def check_stats(device: str = "cpu", cases=((300, 6, 64, None), (256, 2, 64, 64), (1024, 3, 6, None), (130, 4, 100, 130))) -> None:
    """A layer's routing statistics from the two kernels (moe/triton_stats.py) against stats.compute_stats' PyTorch ops: every
    field, counts exactly; unused slots (-1), dropped slots and a token with none kept among them; one sequence and
    several (64 tokens: one program each), 6 and 100 experts (padded to 8 and 128 columns), partial last programs."""
    from routerlab.moe import stats as stats_module
    from routerlab.moe.stats import RoutingStats

    for T, k, E, L in cases:
        experts = torch.randint(-1, E, (T, k), device=device)
        kept = (experts >= 0) & (torch.rand(T, k, device=device) < 0.8)
        kept[3] = False
        kept = kept.t().contiguous().t()  # slot-major underneath, as the layer keeps it (plan.kept.view(k, T).t())
        logits = torch.randn(T, E, device=device) * 3
        got = stats_module.stats_from_routing(experts, logits, kept, E, L)
        uses = stats_module.triton_device
        stats_module.triton_device = lambda t: False
        try:
            want = stats_module.stats_from_routing(experts, logits, kept, E, L)
        finally:
            stats_module.triton_device = uses
        assert got.load._base is not None and got.load._base.numel() == 3 * E + 9, "the kernels' buffer should hold the fields"
        for field in ("load", "kept", "tokens", "dropped_tokens", "batches", "sequences"):
            assert torch.equal(getattr(got, field), getattr(want, field)), f"stats T={T} k={k} E={E} L={L}: {field} differs"
        for field in ("prob_sum", "entropy_sum", "z_sum", "max_logit", "vio_batch_sum", "vio_seq_sum"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-4), f"stats T={T} k={k} E={E} L={L}: {field} {a} against {b}"
        assert isinstance(got, RoutingStats) and float(got.sequences) == (T // L if L else 1)


def check_topk_softmax(device: str = "cpu") -> None:
    """The fused softmax + top-k (routers/triton_topk.py) against PyTorch's softmax, topk, gather and logsumexp:
    values, and the gradient of every combination of the outputs a router uses; then a preset-like router
    (k=6 of 64, importance balance at power 0, z-loss) with the kernel against the same router without it."""
    from routerlab.routers.gated import GatedRouter
    from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams
    from routerlab.routers.triton_topk import TopKSoftmax

    def close(got, want, what, tol=1e-5):
        assert torch.allclose(got, want, atol=tol, rtol=tol), f"{what}: max error {float((got - want).abs().max())}"

    for T, E, k, renorm in [(70, 64, 6, True), (70, 64, 6, False), (33, 6, 1, False), (5, 100, 3, True), (1, 8, 8, True)]:
        logits = torch.randn(T, E, dtype=torch.float64).float().to(device).requires_grad_(True)
        probs, lse, experts, weights, _, _ = TopKSoftmax.apply(logits, k, renorm)
        ref = logits.detach().requires_grad_(True)
        ref_probs = ref.softmax(-1)
        ref_experts = ref_probs.detach().topk(k, dim=-1).indices
        ref_weights = ref_probs.gather(1, ref_experts)
        if renorm:
            ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
        ref_lse = ref.logsumexp(-1)
        case = f"T={T} E={E} k={k} renorm={renorm}"
        assert torch.equal(experts, ref_experts), f"{case}: other experts chosen"
        close(probs, ref_probs, f"{case} probs"), close(lse, ref_lse, f"{case} lse"), close(weights, ref_weights, f"{case} weights")
        for used in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (1, 0, 1)]:
            gs = [torch.randn_like(t) for t in (probs, lse, weights)]
            parts = [(g * t).sum() for on, g, t in zip(used, gs, (probs, lse, weights)) if on]
            ref_parts = [(g * t).sum() for on, g, t in zip(used, gs, (ref_probs, ref_lse, ref_weights)) if on]
            got, = torch.autograd.grad(sum(parts), logits, retain_graph=True)
            want, = torch.autograd.grad(sum(ref_parts), ref, retain_graph=True)
            close(got, want, f"{case} gradient of {used} (probs, lse, weights)")

    # a non-finite row (a diverging run) still names real experts: NaN first, as torch.topk ranks it, then the largest
    logits = torch.randn(3, 6, device=device)
    logits[1, 4], logits[2, :] = float("nan"), float("-inf")
    experts = TopKSoftmax.apply(logits, 3, True)[2]
    assert int(experts[1, 0]) == 4 and torch.equal(experts[1, 1:], torch.where(torch.arange(6, device=device) == 4, -1e9, logits[1]).topk(2).indices)
    assert torch.equal(experts[2], torch.arange(3, device=device)), "a row of -inf takes the first experts"
    assert bool(((experts >= 0) & (experts < 6)).all())

    # routers with the kernel against the same routers without it: the preset's (importance balance at power 0, z-loss),
    # the losses the kernels also compute (each alone, the batch balance with the z-loss, in training and evaluation,
    # 300 tokens: five programs' partials) and one they leave to PyTorch (the balance over sequences)
    def routed(router, x, g, kernel):
        original = GatedRouter.uses_fused_topk
        if not kernel:
            GatedRouter.uses_fused_topk = lambda *args: False
        try:
            out = router(x)
        finally:
            GatedRouter.uses_fused_topk = original
        loss = (out.weights * g).sum() + sum(out.aux.values(), torch.zeros((), device=device))
        return out, torch.autograd.grad(loss, [x, router.gate.weight])

    cases = [(dict(importance_balance=0.01, importance_power=0.0, z_loss=1e-3), True, ["z_loss", "importance_balance"]),
             (dict(importance_balance=0.01, importance_power=0.0), False, ["importance_balance"]),
             (dict(balance_batch=0.02, z_loss=1e-3), True, ["balance_batch", "z_loss"]),
             (dict(balance_batch=0.02, z_loss=1e-3), False, ["z_loss"]),
             (dict(z_loss=1e-2), True, ["z_loss"]),
             (dict(balance_sequence=0.02, z_loss=1e-3), True, ["balance_sequence", "z_loss"])]
    for options, training, names in cases:
        torch.manual_seed(1)
        router = SoftmaxTopK(32, 64, SoftmaxTopKParams(k=6, **options)).to(device).train(training)
        x = torch.randn(300, 32, device=device, requires_grad=True)
        g = torch.randn(300, 6, device=device)
        fused, got = routed(router, x, g, True)
        plain, want = routed(router, x, g, False)
        case = f"{options} training={training}"
        assert router.uses_fused_topk(fused.logits, 6, None, None), f"{case}: the router should take the kernel here"
        assert (router.fused_losses(300) is None) == ("balance_sequence" in options), f"{case}: the kernels compute the wrong losses"
        assert torch.equal(fused.experts, plain.experts) and list(fused.aux) == list(plain.aux) == names, f"{case}: {list(fused.aux)}"
        close(fused.weights, plain.weights, f"{case} router weights")
        for name in fused.aux:
            close(fused.aux[name], plain.aux[name], f"{case} {name}")
        for what, a, b in zip(("grad x", "grad gate"), got, want):
            close(a, b, f"{case} {what}")


def test_the_trainer_bench_files_each_kernel_under_its_part():
    # by Triton function name, first matching part wins: the router's kernels once fell under the experts' "_fwd"
    from routerlab.bench.trainer import kernel_part
    from routerlab.moe import triton_combine, triton_plan, triton_stats, triton_swiglu
    from routerlab import triton_adamw
    from routerlab.routers import triton_gate, triton_topk

    for kernel, part in [(triton_topk._topk_softmax, "router"), (triton_topk._topk_softmax_grad, "router"),
                         (triton_topk._router_losses, "router"),
                         (triton_gate._gate_logits, "router"), (triton_gate._split_hi_lo, "router"),
                         (triton_gate._gate_input_grad, "router"), (triton_gate._gate_weight_grad, "router"),
                         (triton_adamw._grad_sq_sums, "optimizer"), (triton_adamw._adamw, "optimizer"),
                         (triton_swiglu._fwd, "experts"), (triton_swiglu._bwd, "experts"),
                         (triton_combine._gather_rows, "dispatch + combine"), (triton_combine._combine_grads, "dispatch + combine"),
                         (triton_plan._plan_histogram, "dispatch + combine"), (triton_plan._plan_offsets, "dispatch + combine"),
                         (triton_plan._plan_place, "dispatch + combine"), (triton_stats._stats_partials, "routing statistics"),
                         (triton_stats._stats_finish, "routing statistics")]:
        assert kernel_part(kernel.__name__).startswith(part), f"{kernel.__name__} is filed under {kernel_part(kernel.__name__)!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_gate_on_cuda():
    check_fp32_gate("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_kernels_on_cuda():
    check_plan("cuda", ((16384, 6, 64), (16384, 1, 8), (8192, 2, 16), (3, 2, 4), (100000, 5, 200)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stats_kernels_on_cuda():
    check_stats("cuda", ((16384, 6, 64, 512), (16384, 1, 8, 512), (8192, 2, 16, None), (5, 2, 4, None)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_topk_on_cuda():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the router's float32 gate computed the same on both paths
    try:
        check_topk_softmax("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def check_fp32_gate(device: str = "cpu") -> None:
    """The float32 gate of a bf16 router (routers/triton_gate.py) against the gate in float64: hi + lo within 2^-13
    of the logits' gradient (a dropped lo misses by 2^-8) over 16 orders of magnitude; logits to fp32 sums, input
    and weight gradients to within bf16's rounding, each gradient alone too, row blocks split over programs
    (600 rows) and column blocks ending inside a tile (300); then a bf16 router takes the kernels only with TF32 on,
    and its logits and gradients are the cast path's."""
    from routerlab.routers.gated import uses_gate_kernel
    from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams
    from routerlab.routers.triton_gate import Fp32Gate, split_hi_lo

    def near(got, want, tol, what):
        assert torch.isfinite(got).all(), f"{what}: non-finite values"
        err = float((got.detach().double() - want.detach()).norm() / want.detach().norm().clamp_min(1e-30))
        assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"

    torch.manual_seed(4)
    g = torch.randn(70, 9, device=device) * torch.logspace(-8, 8, 9, device=device)
    g2 = split_hi_lo(g)
    err = (g2[:, :9].float() + g2[:, 9:].float() - g).abs()
    assert bool((err <= 2 ** -13 * g.abs()).all()), f"hi + lo misses g by up to {float((err / g.abs()).max()):.1e} of it"
    for shape, E in [((150, 72), 6), ((2, 40, 300), 64), ((1, 16), 17), ((600, 24), 128)]:
        case = f"x {shape} E={E}"
        x = torch.randn(shape, device=device).bfloat16()
        w = (torch.randn(E, shape[-1], device=device) * 0.1).bfloat16()
        g = torch.randn(*shape[:-1], E, device=device)
        xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
        ref = xr @ wr.t()
        want_x, want_w = torch.autograd.grad(ref, [xr, wr], g.double())
        for needs in [(True, True), (True, False), (False, True)]:
            xi, wi = x.clone().requires_grad_(needs[0]), w.clone().requires_grad_(needs[1])
            logits = Fp32Gate.apply(xi, wi)
            assert logits.dtype == torch.float32 and logits.shape == ref.shape
            near(logits, ref, 1e-6, f"{case} logits")
            grads = torch.autograd.grad(logits, [t for t, on in zip((xi, wi), needs) if on], g)
            for (what, want), got in zip([(n, v) for n, v, on in zip(("grad x", "grad w"), (want_x, want_w), needs) if on], grads):
                assert got.dtype == torch.bfloat16, f"{case} {what}: {got.dtype}"
                near(got, want, 2 ** -7, f"{case} {what} {needs}")  # bf16's rounding
    empty = torch.zeros(0, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 8, device=device).bfloat16().requires_grad_(True)
    out = Fp32Gate.apply(empty, weight)
    assert out.shape == (0, 4) and float(torch.autograd.grad(out.sum(), weight)[0].abs().sum()) == 0

    tf32, capturing = torch.backends.cuda.matmul.allow_tf32, torch.cuda.is_current_stream_capturing
    router = SoftmaxTopK(48, 64, SoftmaxTopKParams(k=6, z_loss=1e-3)).to(device, torch.bfloat16)
    x = torch.randn(90, 48, device=device).bfloat16().requires_grad_(True)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not uses_gate_kernel(x, router.gate), "with TF32 off the gate must compute in full fp32"
        plain = router.raw_logits(x)
        want = torch.autograd.grad(plain.square().sum(), [x, router.gate.weight])
        torch.backends.cuda.matmul.allow_tf32 = True
        if device == "cuda":  # eager CUDA takes the cast path; a step being captured takes the kernels
            assert not uses_gate_kernel(x, router.gate), "an eager CUDA gate should take the cast path"
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
                during_capture = uses_gate_kernel(x, router.gate)
                torch.zeros(1, device=device).add_(1)  # a graph with one node
            assert during_capture, "a bf16 gate captured in a CUDA graph should take the kernels"
            torch.cuda.is_current_stream_capturing = lambda: True  # the same call as under capture, run eagerly
        assert uses_gate_kernel(x, router.gate), "a bf16 router with TF32 on should take the gate kernels"
        kernel = router.raw_logits(x)
        got = torch.autograd.grad(kernel.square().sum(), [x, router.gate.weight])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.cuda.is_current_stream_capturing = tf32, capturing
    near(kernel, plain.double(), 1e-6, "router logits")
    for what, a, b in zip(("grad x", "grad gate"), got, want):
        near(a, b.double(), 2 ** -7, f"router {what}")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert not uses_gate_kernel(x.half(), router.half().gate), "an fp16 gate takes the cast path"
        assert not uses_gate_kernel(x.float(), router.float().gate), "a float32 gate has nothing to cast"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def check_layer_dtypes_and_backends() -> None:
    """The whole GPU path of the layer (Triton kernels, here interpreted) for every backend and dtype the CPU
    path accepts, against plain per-expert PyTorch in float64. Caught: `padded` handing the 3-D [E, C, 2h]
    tensor to the SwiGLU kernel (ValueError), and float64 computed in float32 by the SwiGLU and combine kernels."""
    import torch.nn.functional as F

    from routerlab.moe import ExpertBank, MoELayer
    from routerlab.kernel_choice import uses_triton
    from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

    from routerlab.bench.core import pure_torch

    assert uses_triton(torch.zeros(1)) and not uses_triton(torch.zeros(1, dtype=torch.float64))
    with pure_torch():  # the benchmarks' reference path
        assert not uses_triton(torch.zeros(1)), "pure_torch() left the Triton kernels on"
    assert uses_triton(torch.zeros(1)), "pure_torch() did not restore the Triton kernels"
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
