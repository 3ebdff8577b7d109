"""train.precision, gradient accumulation (train.micro_batches) and the throughput fields, on CPU.

Expected values come from plain PyTorch (one big batch through a copy of the model) or from hand counts.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from routerlab.config import load_config
from routerlab.errors import ConfigError
from routerlab.train import Trainer

TINY = ["model.d_model=32", "model.n_heads=2", "model.num_experts=4", "model.expert_hidden=32", "task.block_size=16",
        "train.eval_batches=1", "train.grad_clip=null", "run.checkpoint=false"]


def make(extra, tmp_path, log=False):
    return Trainer(load_config(None, TINY + [f"run.dir={tmp_path / 'runs'}"] + extra), log=log)


def test_micro_batches_give_the_gradient_of_one_big_batch(tmp_path):
    trainer = make(["train.batch_size=2", "train.micro_batches=4"], tmp_path)
    reference = copy.deepcopy(trainer.model)
    trainer.train_step()
    # plain PyTorch: the same 8 sequences (the trainer draws micro_batches x batch_size at once) in one batch
    batch = trainer.task.batch("train", 8, torch.Generator().manual_seed(trainer.config.seed + 1))
    logits = reference(batch.inputs, batch.token_ids)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1)).backward()
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    # the step's routing stats are the sum over its micro-batches: every token of the 8 sequences, k=2 slots each
    assert float(trainer.layers[0].stats.load.sum()) == 8 * 16 * 2


def test_bf16_mixed_keeps_fp32_master_weights_and_computes_in_bf16(tmp_path):
    trainer = make(["train.precision=bf16-mixed", "train.batch_size=4"], tmp_path)
    seen = {}
    trainer.model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o.dtype))
    router = trainer.layers[0].router
    router.register_forward_hook(lambda m, i, o: seen.__setitem__("router", o.logits.dtype))
    trainer.layers[0].experts.register_forward_hook(lambda m, i, o: seen.__setitem__("experts", o.dtype))
    trainer.train_step()
    assert seen == {"qkv": torch.bfloat16, "router": torch.float32, "experts": torch.bfloat16}
    for name, p in trainer.model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32, name


@pytest.mark.parametrize("precision,survives", [("bf16-mixed", True), ("bf16-pure", False), ("fp32", True)])
def test_update_below_a_bf16_ulp(precision, survives, tmp_path):
    """Weights at 1.0 (bf16 ulp 2^-7 = 0.0078) take one AdamW step of lr 1e-4: fp32 master weights keep it."""
    trainer = make([f"train.precision={precision}", "train.batch_size=4", "train.lr=1e-4", "train.lr_schedule=constant"], tmp_path)
    head = trainer.model.head.weight
    with torch.no_grad():
        head.fill_(1.0)
    trainer.train_step()
    delta = (head.detach().double() - 1.0).abs()
    if survives:
        assert (delta > 0).float().mean() > 0.9  # (nearly) every weight moved
        assert float(delta.max()) <= 1e-4 * 1.001  # by at most lr: Adam's first step is lr * m/sqrt(v)
    else:
        assert float(delta.max()) == 0.0  # bf16 weights: 1 - 1e-4 rounds back to 1


def test_old_dtype_key_maps_onto_precision():
    assert load_config(None, ["train.dtype=float32"]).train.precision == "fp32"
    assert load_config(None, ["train.dtype=bfloat16"]).train.precision == "bf16-pure"
    assert load_config(None, []).train.precision == "fp32"
    with pytest.raises(ConfigError, match="dtype=bfloat16 .*contradicts precision=bf16-mixed; set only precision"):
        load_config(None, ["train.dtype=bfloat16", "train.precision=bf16-mixed"])
    with pytest.raises(ConfigError, match="dtype 'float16' is not supported; use precision: fp32 | bf16-mixed | bf16-pure"):
        load_config(None, ["train.dtype=float16"])
    with pytest.raises(ConfigError, match="train.precision: Input should be 'fp32', 'bf16-mixed' or 'bf16-pure'"):
        load_config(None, ["train.precision=fp16"])


def test_throughput_fields_count_steady_steps_and_active_flops(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make(["train.batch_size=2", "train.steps=5", "train.timing_skip=2", "train.peak_flops=1e12", "train.eval_every=5",
                    "train.log_every=5", "router.k=2"], tmp_path, log=True)
    metrics = trainer.fit()
    trainer.close()
    steady = trainer.step_log[2:]  # (seconds, tokens) of steps 3..5; the first two and evaluation are left out
    assert len(trainer.step_log) == 5 and all(n == 2 * 16 for _, n in trainer.step_log)
    assert trainer.train_tokens == 5 * 2 * 16  # every step counts here (the ablation tables' train_tokens)
    tps = sum(n for _, n in steady) / sum(s for s, _ in steady)
    assert metrics["tokens_per_s"] == pytest.approx(tps)
    assert metrics["step_time_ms"] == pytest.approx(1e3 * sum(s for s, _ in steady) / 3)
    # hand count, d=32, h=32, E=4, k=2, 2 layers, vocab V, block 16: per layer qkv+proj 4d^2, gate dE, k experts 3dh
    d, h, E, k, L, V, block = 32, 32, 4, 2, 2, trainer.task.vocab_size, 16
    flops = 6 * (L * (4 * d * d + d * E + k * 3 * d * h) + V * d) + 12 * L * d * block
    assert trainer.flops_per_token() == pytest.approx(flops)
    assert metrics["mfu"] == pytest.approx(flops * tps / 1e12)
    acc = EventAccumulator(str(trainer.run_dir), size_guidance={"scalars": 0}).Reload()
    assert {"perf/tokens_per_s", "perf/step_time_ms", "perf/mfu"} <= set(acc.Tags()["scalars"])


def routers_with_defaults() -> list:
    """Every registered router with options it builds from alone (replay and rl read a file another command wrote)."""
    from routerlab.routers.registry import router_names

    options = {"oracle": {"expert": 0}}
    return [pytest.param({"name": name, **options.get(name, {})}, id=name) for name in router_names() if name not in ("replay", "rl")]


@pytest.mark.parametrize("spec", routers_with_defaults())
def test_every_router_runs_in_a_layer_cast_to_bfloat16(spec):
    """bf16-pure casts the whole model, buffers included (lsh's hyperplanes were cast and its float32 matmul then
    failed): forward and backward run, and the output and x's gradient are bfloat16 and finite."""
    from routerlab.moe import ExpertBank, MoELayer
    from routerlab.routers.registry import build_router

    torch.manual_seed(0)
    T, d, E = 64, 16, 4
    layer = MoELayer(build_router(spec, d, E), ExpertBank(E, d, 8), None).to(torch.bfloat16)
    x = torch.randn(T, d, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x, torch.randint(0, 100, (T,)))
    (out.float().sum() + sum(v.float() for v in layer.aux_losses.values())).backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
