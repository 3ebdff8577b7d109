"""Property-based tests (hypothesis): the config parser and plan_dispatch against plain references."""
import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerlab.config import apply_overrides, load_config, make_config
from routerlab.errors import ConfigError
from routerlab.moe import plan_dispatch

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- plan_dispatch ---------------------------------------------------------------------------------
def kept_reference(experts: list[list[int]], num_experts: int, capacity: int | None) -> list[list[bool]]:
    """A loop over slots in priority order: all first choices (token order), then all second choices, ..."""
    T, k = len(experts), len(experts[0])
    used = [0] * num_experts
    kept = [[False] * T for _ in range(k)]
    for j in range(k):
        for t in range(T):
            e = experts[t][j]
            if e >= 0 and (capacity is None or used[e] < capacity):
                used[e] += 1
                kept[j][t] = True
    return kept


@st.composite
def routings(draw):
    E = draw(st.integers(1, 9))
    T = draw(st.integers(1, 40))
    k = draw(st.integers(1, 4))
    ids = draw(st.lists(st.lists(st.integers(-1, E - 1), min_size=k, max_size=k), min_size=T, max_size=T))
    capacity = draw(st.one_of(st.none(), st.integers(1, T * k + 1)))
    dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    return ids, E, capacity, dtype


@FAST
@given(routings())
def test_plan_dispatch_matches_the_loop_reference(case):
    ids, E, capacity, dtype = case
    experts = torch.tensor(ids, dtype=dtype)
    T, k = experts.shape
    plan = plan_dispatch(experts, E, capacity)
    want = kept_reference(ids, E, capacity)
    assert plan.kept.view(k, T).tolist() == want
    flat = [ids[s % T][s // T] for s in range(T * k)]  # slot j * T + t
    counts = [sum(1 for j in range(k) for t in range(T) if want[j][t] and ids[t][j] == e) for e in range(E)]
    assert plan.counts.tolist() == counts and int(plan.n_kept) == sum(counts)
    n = sum(counts)
    order = plan.order.tolist()
    assert sorted(order) == list(range(T * k))  # a permutation of the slots
    assert [flat[s] for s in order[:n]] == [e for e in range(E) for _ in range(counts[e])]  # grouped by expert
    for e in range(E):  # within an expert, priority order (slot-major, token order)
        rows = [s for s in order[:n] if flat[s] == e]
        assert rows == sorted(rows)
    assert all(plan.kept.tolist()[s] for s in order[:n]) and not any(plan.kept.tolist()[s] for s in order[n:])
    assert [plan.inv.tolist()[s] for s in order] == list(range(T * k))  # inv inverts order
    assert plan.token_of_row.tolist() == [s % T for s in order]


# ---- the config parser -----------------------------------------------------------------------------
finite = st.floats(min_value=1e-6, max_value=10.0, allow_nan=False, allow_infinity=False)
VALID = {
    "seed": st.integers(0, 2**31 - 1),
    "model.d_model": st.integers(1, 512),
    "model.num_experts": st.integers(2, 64),
    "model.capacity_factor": st.one_of(st.none(), finite),
    "train.lr": finite,
    "train.steps": st.integers(1, 10**6),
    "train.grad_clip": st.one_of(st.none(), finite),
    "train.weight_decay": st.floats(min_value=0.0, max_value=1.0),
    "train.lr_schedule": st.sampled_from(["constant", "cosine"]),
    "router.z_loss": st.floats(min_value=0.0, max_value=1.0),
}


@FAST
@given(st.dictionaries(st.sampled_from(sorted(VALID)), st.just(None)).flatmap(
    lambda keys: st.fixed_dictionaries({k: VALID[k] for k in keys})))
def test_set_overrides_round_trip_through_yaml_text(values):
    """`--set key=<value as YAML text>` parses to the value itself; dumping the config and parsing it again
    gives the same config and fingerprint."""
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}" for key, value in values.items()]
    config = load_config(None, overrides)
    dumped = config.model_dump(mode="json")
    for key, value in values.items():
        node = dumped
        for part in key.split("."):
            node = node[part]
        assert node == value or (isinstance(value, float) and math.isclose(node, value, rel_tol=0, abs_tol=0))
    again = make_config(dumped)
    assert again == config and again.fingerprint() == config.fingerprint()


@FAST
@given(st.sampled_from(["train.lr", "train.grad_clip", "model.capacity_factor", "train.weight_decay", "router.z_loss", "router.jitter"]),
       st.sampled_from([".inf", "-.inf", ".nan", "1e999", "-1e999", "inf", "nan"]))
def test_a_non_finite_number_is_refused_anywhere(key, text):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_config(None, [f"{key}={text}"])


KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@FAST
@given(st.sampled_from(["model", "train", "run"]), KEYS)
def test_an_unknown_key_is_named_in_the_error(section, key):
    known = set(make_config({}).model_dump()[section])
    if key in known:
        return
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: Extra inputs are not permitted"):
        load_config(None, [f"{section}.{key}=1"])


@FAST
@given(st.lists(st.tuples(st.sampled_from(["train.steps", "train.lr", "seed"]), st.integers(1, 1000)), min_size=1, max_size=5))
def test_the_last_override_of_a_key_wins(pairs):
    data = apply_overrides({}, [f"{k}={v}" for k, v in pairs])
    last = {}
    for k, v in pairs:
        last[k] = v
    for k, v in last.items():
        node = data
        for part in k.split("."):
            node = node[part]
        assert node == v
