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


def client_task(task: Task, setup, partition_id: int) -> Task:
    """A shallow copy of `task` holding only client `partition_id`'s data (the base task is untouched)."""
    fed = setup.fed
    seed = setup.config.seed if fed.partition_seed is None else fed.partition_seed
    if not 0 <= partition_id < fed.num_clients:
        raise ConfigError(f"partition-id {partition_id} is outside 0..{fed.num_clients - 1} (federated.num_clients={fed.num_clients})")
    part = copy.copy(task)
    part.data = dict(task.data)
    if task.kind == "lm":
        ids = task.data["train"]
        piece = ids[torch.as_tensor(split_indices(np.zeros(len(ids)), fed.num_clients, "contiguous")[partition_id])]
        n_val = int(len(piece) * getattr(task.params, "val_frac", 0.1))
        if min(n_val, len(piece) - n_val) <= task.block_size + 1:
            raise ConfigError(f"a slice of {len(piece)} characters per client is too short for block_size={task.block_size}; use fewer clients or a shorter block_size")
        part.data = {"train": piece[: len(piece) - n_val], "val": piece[len(piece) - n_val:]}
        return part
    targets = task.data["train"][1].numpy()
    parts = split_indices(targets, fed.num_clients, fed.partition, alpha=fed.alpha, classes_per_client=fed.classes_per_client,
                          seed=seed, min_examples=fed.min_examples)
    mine = parts[partition_id]
    val = client_eval_indices(targets[mine], task.data["val"][1].numpy(), seed * 1000 + partition_id)
    return task.subset("train", torch.as_tensor(mine, dtype=torch.long)).subset("val", torch.as_tensor(val, dtype=torch.long))
