"""Check a study's winner on data it never saw: train configs with several seeds and evaluate each on
fresh samples of the `clusters` task (a new draw from the same clusters, not the validation set the
study selected on).

    python -m studies.heldout results/studies/NAME/baseline.yaml results/studies/NAME/best_config.yaml --seeds 1 2 3
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from routerlab.config import load_config, make_config
from routerlab.errors import ConfigError
from routerlab.train import Trainer

HELDOUT_SEED = 20261128  # the fresh draw; the task's own train/val draws use task.seed


def heldout_loss(config_path: str, seed: int, samples: int) -> dict[str, float]:
    data = load_config(config_path).model_dump(mode="json")
    data["seed"] = seed
    data["run"]["checkpoint"] = False
    config = make_config(data)
    if config.task.name != "clusters":
        raise ConfigError("studies.heldout draws fresh samples of the clusters task only")
    trainer = Trainer(config, log=False)
    trainer.fit()
    task = trainer.task
    task.data["heldout"] = task._make(samples, torch.Generator().manual_seed(HELDOUT_SEED))
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    batch = config.train.batch_size
    trainer.eval_set = [task.batch("heldout", batch, g) for _ in range(max(1, samples // batch))]
    metrics = trainer.evaluate()
    return {"loss": metrics["loss"], "accuracy": metrics["accuracy"], "max_vio": metrics["max_vio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--samples", type=int, default=8192)
    args = parser.parse_args()
    print("| config | seeds | held-out loss (mean ± std) | accuracy | MaxVio |")
    print("|---|---|---:|---:|---:|")
    for path in args.configs:
        rows = [heldout_loss(path, s, args.samples) for s in args.seeds]
        loss = np.array([r["loss"] for r in rows])
        print(f"| {path} | {' '.join(map(str, args.seeds))} | {loss.mean():.4f} ± {loss.std():.4f} "
              f"| {np.mean([r['accuracy'] for r in rows]):.4f} | {np.mean([r['max_vio'] for r in rows]):.3f} |")
        print("  per seed: " + ", ".join(f"{s}: {r['loss']:.4f}" for s, r in zip(args.seeds, rows)), flush=True)


if __name__ == "__main__":
    main()
