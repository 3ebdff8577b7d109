"""The trainer option: record routing traces at chosen steps of a training run, and (optionally) log the
regret against the oracle at every evaluation, through the Trainer's public hooks.

    recorder = TraceRecorder(trainer, steps=[0, 100, 300], regret=True)
    recorder.attach()            # trainer.on_step / trainer.on_eval; traces go to <run>/traces/step*.npz
    trainer.fit()

Step 0 (before training) is recorded by attach(). `routerlab train --trace-steps 0,100,300` does the same.
"""
from __future__ import annotations

from pathlib import Path

from routerlab.analysis.regret import layer_regrets, regret_metrics
from routerlab.analysis.trace import probe_batches, record_trace, save_trace, trace_path
from routerlab.errors import ConfigError


def parse_steps(text: str) -> list[int]:
    """'0,100,300' -> [0, 100, 300]; '' -> []."""
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--trace-steps expects comma-separated step numbers such as 0,100,300, got {text!r}") from None
    if any(s < 0 for s in steps):
        raise ConfigError(f"--trace-steps expects steps >= 0, got {text!r}")
    return steps


def record_during(trainer, steps: list[int]) -> "TraceRecorder | None":
    """The `routerlab train --trace-steps` option: traces at `steps`, regret at every evaluation."""
    if not steps:
        return None
    if trainer.parallel.world_size > 1:  # the probe forward would need every rank's collectives
        raise ConfigError("--trace-steps runs in one process; under torchrun trace the checkpoint afterwards with 'routerlab trace RUN'")
    if not hasattr(trainer, "on_step"):
        raise ConfigError("--trace-steps needs the trainer's on_step hook (this routerlab's Trainer has none)")
    return TraceRecorder(trainer, steps, regret=True).attach()


class TraceRecorder:
    def __init__(self, trainer, steps=(), *, probe: int = 1, logits: bool = True, regret: bool = False, run_dir: str | Path | None = None) -> None:
        self.trainer = trainer
        self.steps = set(int(s) for s in steps)
        self.logits = logits
        self.regret = regret
        self.run_dir = Path(run_dir if run_dir is not None else trainer.run_dir)
        self.probe = probe_batches(trainer, probe)
        self.written: list[Path] = []
        self._writer = None

    def attach(self) -> "TraceRecorder":
        if 0 in self.steps and self.trainer.step == 0:
            self.record(0)
        self.trainer.on_step(self.on_step)
        if self.regret:
            self.trainer.on_eval(self.on_eval)
        return self

    def record(self, step: int) -> Path:
        path = save_trace(trace_path(self.run_dir, step), record_trace(self.trainer, self.probe, logits=self.logits))
        self.written.append(path)
        return path

    def on_step(self, step: int, loss: float) -> None:
        if step in self.steps:
            self.record(step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Regret, MRR and oracle gap on the probe set, logged as analysis/<metric>/layer<i>."""
        values = regret_metrics(layer_regrets(self.trainer, self.probe))
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir))
        for key, value in values.items():  # 'layer0/regret' -> analysis/regret/layer0; 'regret' (mean) -> analysis/regret
            layer, _, metric = key.rpartition("/")
            self._writer.add_scalar(f"analysis/{metric}/{layer}" if layer else f"analysis/{metric}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
