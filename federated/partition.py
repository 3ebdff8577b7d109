"""Splitting a task's training data across N clients. A fixed seed gives the same split.

Classification tasks (digits, clusters) are split by example index of the train split:
  iid         a random permutation cut into N near-equal parts;
  dirichlet   per class, proportions over clients drawn from Dir(alpha) (small alpha = strong label
              skew); redrawn until every client holds at least `min_examples`;
  classes     every client gets `classes_per_client` classes; a class is shared evenly among the
              clients that hold it (needs num_clients * classes_per_client >= number of classes);
  contiguous  the train split in its stored order cut into N parts.
Each split covers every training example exactly once. A client's evaluation set is drawn (with
replacement, seeded) from the shared validation split with the client's own class mix, so "per-client
accuracy" measures each client on data like its own.

Corpus LM tasks with domain labels (`stdlib`: a domain = a top-level package) are split by domain
(`domains`): each client holds a disjoint set of packages, train and validation text alike.
`chars` is cut into N contiguous slices of the corpus (topic skew: the Python docs are ordered by
topic); each client keeps the last val_frac of its slice as its own validation text.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from routerlab.errors import ConfigError
from routerlab.tasks import Task

MAX_DRAWS = 1000


def split_indices(labels: np.ndarray, num_clients: int, scheme: str, *, alpha: float = 1.0, classes_per_client: int = 2,
                  seed: int = 0, min_examples: int = 1) -> list[np.ndarray]:
    """Indices into `labels` for each client; together they cover every index exactly once."""
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    if num_clients > n:
        raise ConfigError(f"{num_clients} clients but only {n} training examples; use at most {n} clients")
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "contiguous":
        return list(np.array_split(np.arange(n), num_clients))
    classes = np.unique(labels)
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ConfigError(f"alpha must be > 0 (Dirichlet concentration), got {alpha}")
        need = min(min_examples, n // num_clients)
        for _ in range(MAX_DRAWS):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for c in classes:
                idx = by_class[c]
                share = rng.dirichlet(np.full(num_clients, alpha))
                cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
                for client, piece in enumerate(np.split(idx, cuts)):
                    parts[client].append(piece)
            out = [np.sort(np.concatenate(p)) for p in parts]
            if min(len(p) for p in out) >= need:
                return out
        raise ConfigError(f"no Dirichlet split with alpha={alpha} gives each of {num_clients} clients {need} examples in {MAX_DRAWS} draws; raise alpha or lower federated.min_examples")
    if scheme == "classes":
        k, num_classes = classes_per_client, len(classes)
        if k > num_classes or num_clients * k < num_classes:
            raise ConfigError(f"partition=classes needs classes_per_client <= {num_classes} and num_clients * classes_per_client >= {num_classes} (so every class has a client); got {num_clients} x {k}")
        order = rng.permutation(classes)
        owned = [[order[(client * k + j) % num_classes] for j in range(k)] for client in range(num_clients)]
        holders = {c: [i for i, cs in enumerate(owned) if c in cs] for c in classes}
        parts = [[] for _ in range(num_clients)]
        for c in classes:
            for client, piece in zip(holders[c], np.array_split(by_class[c], len(holders[c]))):
                parts[client].append(piece)
        return [np.sort(np.concatenate(p)) for p in parts]
    raise ConfigError(f"unknown partition {scheme!r}; valid partitions: iid, dirichlet, classes, contiguous")


def client_eval_indices(train_labels: np.ndarray, val_labels: np.ndarray, seed: int) -> np.ndarray:
    """Validation indices drawn with the client's class mix (as many as the validation split holds)."""
    val_labels = np.asarray(val_labels)
    classes, counts = np.unique(train_labels, return_counts=True)
    weight = np.zeros(len(val_labels))
    for c, count in zip(classes, counts):
        members = val_labels == c
        if members.any():
            weight[members] = count / members.sum()
    if weight.sum() == 0:  # none of the client's classes appear in validation: fall back to all of it
        weight[:] = 1.0
    rng = np.random.default_rng(seed)
    return rng.choice(len(val_labels), size=len(val_labels), replace=True, p=weight / weight.sum())


def domain_sets(task: Task, num_clients: int, seed: int) -> list[list[int]]:
    """Disjoint sets of domain ids, one per client: domains by training tokens, largest first, each to the
    client with the fewest tokens so far (ties by a seeded order), so clients are natural non-IID domains
    of similar size."""
    labels = np.asarray(task.token_labels["train"])
    counts = np.bincount(labels, minlength=len(task.domains))
    present = [d for d in np.random.default_rng(seed).permutation(len(counts)) if counts[d] > 0]
    if len(present) < num_clients:
        raise ConfigError(f"task {task.name!r} has {len(present)} domains with training text, fewer than {num_clients} clients")
    sets: list[list[int]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients)
    for d in sorted(present, key=lambda d: -counts[d]):  # stable: ties keep the seeded order
        c = int(np.argmin(sizes))
        sets[c].append(int(d))
        sizes[c] += counts[d]
    return [sorted(s) for s in sets]


def client_task(task: Task, setup, partition_id: int) -> Task:
    """A shallow copy of `task` holding only client `partition_id`'s data (the base task is untouched)."""
    fed = setup.fed
    seed = setup.config.seed if fed.partition_seed is None else fed.partition_seed
    total = fed.num_clients + fed.unseen_clients  # unseen clients hold data too; they just never train
    if not 0 <= partition_id < total:
        raise ConfigError(f"partition-id {partition_id} is outside 0..{total - 1} (federated.num_clients + unseen_clients = {total})")
    part = copy.copy(task)
    if getattr(task, "token_labels", None) is not None:  # a corpus LM with domain labels (stdlib): clients are domains
        if fed.partition != "domains":
            raise ConfigError(f"task {task.name!r} is split by its domains; set federated.partition=domains (got {fed.partition!r})")
        domains = domain_sets(task, total, seed)[partition_id]
        part.tokens, part.token_labels = dict(task.tokens), dict(task.token_labels)
        for split in ("train", "val"):
            keep = np.isin(np.asarray(task.token_labels[split]), domains)
            part.tokens[split] = np.asarray(task.tokens[split])[keep]
            part.token_labels[split] = np.asarray(task.token_labels[split])[keep]
        if len(part.tokens["val"]) <= 4 * task.block_size:  # its packages' files all hashed to train: hold out its last val_frac
            n_val = int(len(part.tokens["train"]) * task.params.val_frac)
            for arrays in (part.tokens, part.token_labels):
                arrays["val"], arrays["train"] = arrays["train"][-n_val:], arrays["train"][:-n_val]
        for split in ("train", "val"):
            if len(part.tokens[split]) <= task.block_size + 1:
                names = ", ".join(task.domains[d] for d in domains)
                raise ConfigError(f"client {partition_id} (domains {names}) has {len(part.tokens[split])} {split} tokens, too few for block_size={task.block_size}; use fewer clients")
        return part
    part.data = dict(task.data)
    if task.kind == "lm":
        ids = task.data["train"]
        piece = ids[torch.as_tensor(split_indices(np.zeros(len(ids)), total, "contiguous")[partition_id])]
        n_val = int(len(piece) * getattr(task.params, "val_frac", 0.1))
        if min(n_val, len(piece) - n_val) <= task.block_size + 1:
            raise ConfigError(f"a slice of {len(piece)} characters per client is too short for block_size={task.block_size}; use fewer clients or a shorter block_size")
        part.data = {"train": piece[: len(piece) - n_val], "val": piece[len(piece) - n_val:]}
        return part
    targets = task.data["train"][1].numpy()
    parts = split_indices(targets, total, fed.partition, alpha=fed.alpha, classes_per_client=fed.classes_per_client,
                          seed=seed, min_examples=fed.min_examples)
    mine = parts[partition_id]
    val = client_eval_indices(targets[mine], task.data["val"][1].numpy(), seed * 1000 + partition_id)
    return task.subset("train", torch.as_tensor(mine, dtype=torch.long)).subset("val", torch.as_tensor(val, dtype=torch.long))


def pooled_task(task: Task, setup) -> Task:
    """A copy of `task` whose training data is the union of the seen clients' partitions (the
    centralized baseline: the same examples the federation trains on, in one place)."""
    fed = setup.fed
    parts = [client_task(task, setup, pid) for pid in range(fed.num_clients)]
    pooled = copy.copy(task)
    if getattr(task, "token_labels", None) is not None:
        pooled.tokens, pooled.token_labels = dict(task.tokens), dict(task.token_labels)
        for split in ("train", "val"):
            pooled.tokens[split] = np.concatenate([p.tokens[split] for p in parts])
            pooled.token_labels[split] = np.concatenate([p.token_labels[split] for p in parts])
        return pooled
    pooled.data = dict(task.data)
    if task.kind == "lm":
        pooled.data["train"] = torch.cat([p.data["train"] for p in parts])
        pooled.data["val"] = torch.cat([p.data["val"] for p in parts])
        return pooled
    pooled.data["train"] = tuple(torch.cat([p.data["train"][i] for p in parts]) for i in range(len(task.data["train"])))
    return pooled
