"""Metrics out: one console line per step, `metrics.jsonl`, TensorBoard, and wandb when configured."""

from __future__ import annotations

import json
import math
import os

# (metric key, column label, format) of the one-line-per-step console summary
CONSOLE = [
    ("actor/loss", "actor_loss", "{:+.4f}"), ("critic/loss", "critic_loss", "{:.4f}"),
    ("reward/mean", "reward", "{:.3f}"), ("actor/kl", "kl", "{:.4f}"), ("actor/entropy", "entropy", "{:.3f}"),
    ("response/length_mean", "resp_len", "{:.1f}"), ("timing/sync", "sync_s", "{:.2f}"),
    ("timing/generate", "gen_s", "{:.2f}"), ("timing/train", "train_s", "{:.2f}"), ("perf/tokens_per_s", "tok/s", "{:.0f}"),
]


def console_line(step: int, m: dict) -> str:
    parts = [f"step {step:>4}"]
    for key, label, fmt in CONSOLE:
        if key in m and m[key] is not None and not (isinstance(m[key], float) and math.isnan(m[key])):
            parts.append(f"{label} {fmt.format(m[key])}")
    return " | ".join(parts)


class Tracker:
    def __init__(self, output_dir: str, loggers, config: dict, project: str, experiment: str, resume_step: int = 0,
                 run_id: str | None = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.run_id = run_id  # on every row: which run wrote it
        os.makedirs(output_dir, exist_ok=True)
        if resume_step and os.path.exists(self.path):
            # a resumed run continues the file; lines past the checkpoint's step, or of another run, are dropped
            keep = [ln for ln in open(self.path) if ln.strip() and json.loads(ln)["step"] <= resume_step
                    and json.loads(ln).get("run_id", run_id) == run_id]
            with open(self.path + ".tmp", "w") as f:  # replaced atomically: a crash here loses nothing
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)
        self.file = open(self.path, "a" if resume_step else "w")  # a fresh run starts a fresh file
        self.tb = self.wandb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if "wandb" in loggers:
            import wandb

            self.wandb = wandb.init(project=project, name=experiment, config=config, dir=output_dir, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        self.file.write(json.dumps({**row, "run_id": self.run_id} if self.run_id else row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
