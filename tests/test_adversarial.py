"""Adversarial load balancing: prices stay in their box, the adversary pushes the router off an overloaded
expert, the critic learns to tell skewed usage from balanced usage, and both resume exactly."""
import math

import pytest
import torch

from routerlab.config import load_config
from routerlab.moe.stats import compute_stats
from routerlab.routers import build_router
from routerlab.train import Trainer

E, D = 4, 8


def skewed_stream(steps: int, tokens: int = 64):
    """Fixed inputs whose mean direction the gate below maps to expert 0: every token prefers it."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(tokens, D, generator=g) * 0.3 + 1.0 for _ in range(steps)]


def skewed_router(spec: dict):
    torch.manual_seed(0)
    router = build_router(spec, D, E)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 0.5  # expert 0 wins every token at the start
    return router


def drive(router, stream, lr: float = 0.05):
    """Router alone on the stream: forward, its own aux loss down by SGD, then after_step (as the trainer does)."""
    opt = torch.optim.SGD(router.parameters(), lr=lr)
    history = []
    for x in stream:
        routing = router(x)
        opt.zero_grad()
        sum(routing.aux.values()).backward()
        opt.step()
        kept = torch.zeros(E)
        router.after_step(compute_stats(routing.experts, routing.logits.detach(), kept, torch.ones(x.shape[0])))
        history.append((routing.logits.detach().softmax(-1).mean(0), getattr(router, "prices", torch.zeros(E)).clone()))
    return history


@pytest.mark.parametrize("signal", ["soft", "hard"])
def test_prices_never_negative_and_stay_bounded(signal):
    router = build_router({"name": "adversarial", "price_lr": 0.5, "price_max": 0.3, "price_decay": 1.0, "signal": signal}, D, E)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):  # wild loads, including all tokens on one expert and some experts empty
        load = torch.zeros(E).index_add_(0, torch.randint(0, E, (50,), generator=g) % torch.randint(1, E + 1, (1,), generator=g), torch.ones(50))
        probs = torch.rand(50, E, generator=g).pow(8)
        stats = compute_stats(torch.multinomial(probs, 1, generator=g), probs.log(), load, torch.ones(50))
        router.after_step(stats)
        assert (router.prices >= 0).all() and (router.prices <= 0.3).all()
    assert router.prices.max() > 0  # the box is reached, not an artefact of prices that never move


def test_overloaded_expert_gets_priced_and_avoided():
    router = skewed_router({"name": "adversarial", "k": 1, "price_lr": 0.02, "price_max": 1.0})
    history = drive(router, skewed_stream(60))
    first_probs, _ = history[0]
    prices = torch.stack([p for _, p in history])
    assert first_probs.argmax() == 0 and first_probs[0] > 0.5
    assert (prices[1:10, 0] > prices[:9, 0]).all()  # rises while expert 0 is overloaded
    assert prices[:, 0].max() > prices[:, 1:].max()  # the overloaded expert is the expensive one
    final_probs, _ = history[-1]
    assert final_probs[0] < first_probs[0] - 0.2  # the router's probability for it falls


def test_critic_tells_skew_from_balance_and_moves_the_router():
    router = skewed_router({"name": "adversarial_critic", "k": 1, "weight": 1.0, "group_size": 16, "critic_lr": 0.02})
    history = drive(router, skewed_stream(80))
    first_probs, final_probs = history[0][0], history[-1][0]
    assert final_probs[0] < first_probs[0] - 0.2
    from routerlab.routers.adversarial_critic import critic_logit

    skew = torch.tensor([[E, 0.0, 0.0, 0.0]])  # everything on one expert
    flat = torch.ones(1, E)
    logit = lambda u: float(critic_logit(router.critic, u, router.params.hidden))
    assert logit(skew) > logit(flat)  # the critic calls the collapsed usage "router", the balanced one not


def test_critic_weights_are_not_optimizer_parameters():
    router = build_router({"name": "adversarial_critic"}, D, E)
    names = {n for n, _ in router.named_parameters()}
    assert names == {"gate.weight"}  # AdamW must not step the critic toward helping the router
    assert {"critic", "critic_m", "critic_v", "critic_step"} <= set(router.state_dict())


@pytest.mark.parametrize("spec", [
    ["router.name=adversarial", "router.price_lr=0.05", "router.price_decay=2.0"],
    ["router.name=adversarial_critic", "router.group_size=4", "router.weight=0.5"],
])
def test_resume_restores_the_adversary_exactly(spec, tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["task.name=clusters", "task.zipf=1.5", "router.k=1"] + spec
    make = lambda sub, **kw: Trainer(load_config(None, overrides), run_dir=tmp_path / sub, log=False, **kw)
    full = make("a")
    full.fit()
    first = make("b")
    first.fit(until=5)
    resumed = make("b", resume=first.save())
    adversary = lambda t: {k: v.clone() for k, v in t.model.state_dict().items() if k.split(".")[-1] in ("prices", "critic", "critic_m", "critic_v", "critic_step")}
    assert all(torch.equal(a, b) for a, b in zip(adversary(first).values(), adversary(resumed).values()))
    resumed.fit()
    a, b = adversary(full), adversary(resumed)
    assert a.keys() == b.keys() and len(a) >= 2
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if not k.endswith("_step"))  # the adversary moved
    assert resumed.losses == full.losses


def test_tensorboard_shows_prices_and_critic_loss(tiny_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, tag in [("adversarial", "routing/price_max/layer0"), ("adversarial_critic", "routing/critic_loss/layer1")]:
        run = tmp_path / name
        trainer = Trainer(load_config(None, tiny_overrides + ["task.name=clusters", f"router.name={name}"]), run_dir=run)
        trainer.fit()
        trainer.close()
        events = EventAccumulator(str(run), size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        assert tag in tags and "routing/load_cv/layer0" in tags
        assert len(events.Scalars(tag)) == 12 // 3


def test_critic_catches_imbalance_inside_groups_that_prices_miss():
    """Each micro-batch of 16 tokens goes to one expert, a different one per micro-batch: the batch is perfectly
    balanced (prices see no violation), every group is collapsed (the critic sees it)."""
    x = torch.zeros(64, D)
    x[torch.arange(64), torch.arange(64) // 16] = 1.0 + 0.1 * torch.rand(64, generator=torch.Generator().manual_seed(0))
    stream = [x] * 40

    def frozen(spec):  # lr 0 below: the routing stays as built, only the adversary learns
        router = build_router(spec, D, E)
        with torch.no_grad():
            router.gate.weight.copy_(3.0 * torch.eye(E, D))
        return router

    prices = frozen({"name": "adversarial", "k": 1, "price_lr": 0.05, "price_max": 1.0, "signal": "hard"})
    drive(prices, stream, lr=0.0)
    assert prices.prices.max() == 0  # batch loads are equal: no violation to price

    critic = frozen({"name": "adversarial_critic", "k": 1, "group_size": 16, "critic_lr": 0.02})
    drive(critic, stream, lr=0.0)
    from routerlab.routers.adversarial_critic import critic_logit

    usage = critic.group_usage(x @ critic.gate.weight.t(), critic(x).experts).detach()
    balanced = critic.balanced_usage(4, 16, torch.Generator().manual_seed(5))
    fake, real = critic_logit(critic.critic, usage, 32), critic_logit(critic.critic, balanced, 32)
    assert fake.min() > real.max()  # told apart
    # and the router is charged for it: weight * mean softplus(D) above weight * log 2, i.e. D > 0 ("router")
    assert float(critic(x).aux["critic"].detach()) > 0.05 * math.log(2)


@pytest.mark.parametrize("name", ["adversarial", "adversarial_critic"])
def test_trains_in_bfloat16(name, tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["task.name=chars", f"router.name={name}", "train.dtype=bfloat16", "train.steps=4"]
    trainer = Trainer(load_config(None, overrides), run_dir=tmp_path / "run", log=False)
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss"])
