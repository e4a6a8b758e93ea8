"""Learning-rate warmup and decay (optim.lr_warmup_steps / lr_warmup_steps_ratio / lr_decay_style /
min_lr): the schedule against its closed form, and a resumed PPO run's actor and critic rates
equal to the uninterrupted run's (and reaching the optimizer)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from mcore_rl.config import ConfigError, load_config
from mcore_rl.models.optim import LRSchedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def closed_form(step, lr, style, warmup, decay, init=0.0, min_lr=0.0):
    """The rate of training step `step` (1-based): step s uses the schedule after s - 1 steps;
    linear warmup over `warmup` steps from `init`, then constant, or linear / cosine from lr to
    min_lr over the remaining decay - warmup steps, min_lr afterwards."""
    s = step - 1
    if warmup > 0 and s <= warmup:
        return init + (lr - init) * s / warmup
    if style == "constant":
        return lr
    if s > decay:
        return min_lr
    x = (s - warmup) / (decay - warmup)
    coeff = 1 - x if style == "linear" else 0.5 * (1 + math.cos(math.pi * x))
    return min_lr + coeff * (lr - min_lr)


CASES = [
    ([], dict(style="constant", warmup=0, decay=20)),
    (["lr_warmup_steps=5"], dict(style="constant", warmup=5, decay=20)),
    (["lr_warmup_steps_ratio=0.1", "lr_decay_style=cosine"], dict(style="cosine", warmup=2, decay=20)),
    (["lr_warmup_steps=3", "lr_warmup_steps_ratio=0.5", "lr_decay_style=linear", "min_lr=1e-4"],
     dict(style="linear", warmup=3, decay=20, min_lr=1e-4)),  # explicit steps win over the ratio
    (["lr_decay_style=cosine", "lr_decay_steps=12", "min_lr=2e-4", "lr_warmup_init=1e-4", "lr_warmup_steps=2"],
     dict(style="cosine", warmup=2, decay=12, min_lr=2e-4, init=1e-4)),  # min_lr after 12 steps
]


@pytest.mark.parametrize("overrides,want", CASES)
def test_schedule_matches_closed_form(overrides, want):
    cfg = load_config(None, ["trainer.max_steps=20", "actor_rollout_ref.actor.optim.lr=1e-3"]
                      + [f"actor_rollout_ref.actor.optim.{o}" for o in overrides])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    sched = LRSchedule(opt, cfg.actor_rollout_ref.actor.optim, cfg.trainer.max_steps)
    got = [sched.set_step(s) for s in range(1, 21)]
    ref = [closed_form(s, 1e-3, **want) for s in range(1, 21)]
    for s, (g, r) in enumerate(zip(got, ref), start=1):
        assert math.isclose(g, r, rel_tol=1e-12, abs_tol=1e-15), (s, g, r)
    assert opt.param_groups[0]["lr"] == got[-1]  # the rate is the optimizer's
    # any order (a resume starts in the middle): the rate depends on the step alone
    assert [sched.set_step(s) for s in (7, 3, 20)] == [got[6], got[2], got[19]]


def test_bad_schedules_fail_at_load():
    for bad, msg in ((["actor_rollout_ref.actor.optim.lr_warmup_steps=20"], "fewer than the 20 decay steps"),
                     (["critic.optim.lr_warmup_steps_ratio=1.0"], r"must be in \[0, 1\)"),
                     (["actor_rollout_ref.actor.optim.min_lr=1.0"], "min_lr=1.0 must be in"),
                     (["critic.optim.lr_decay_style=cos"], "constant, linear, cosine")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, ["trainer.max_steps=20", *bad])


# ---------------------------------------------------------------- resume
STEPS = 4
RUN = ["data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
       "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "critic.ppo_micro_batch_size_per_gpu=8",
       "actor_rollout_ref.rollout.name=hf", "trainer.logger=[console]", "trainer.export_hf_at_end=false",
       f"trainer.max_steps={STEPS}", "actor_rollout_ref.actor.optim.lr_warmup_steps=1",
       "actor_rollout_ref.actor.optim.lr_decay_style=cosine", "actor_rollout_ref.actor.optim.min_lr=1e-4",
       "critic.optim.lr_warmup_steps_ratio=0.25", "critic.optim.lr_decay_style=linear"]


def _resume_worker(out, model):
    from mcore_rl.trainer.ppo_trainer import PPOTrainer

    def trainer(run, *extra):
        return PPOTrainer(load_config(None, RUN + [f"actor_rollout_ref.model.path={model}",
                                                   f"trainer.output_dir={out}/{run}", *extra]))

    a = trainer("uninterrupted", "trainer.save_freq=2")
    full = a.fit()
    a.close()
    b = trainer("resumed", f"trainer.resume={out}/uninterrupted/checkpoints/step_00000002")
    assert b.step == 2
    resumed = b.fit()
    b.close()
    return full, resumed


@pytest.mark.resume
def test_resumed_run_continues_the_schedule(tmp_path):
    """PPO with a critic: the actor warms up 1 step then decays (cosine), the critic warms up 1
    step (a quarter of 4) then decays (linear). A run resumed from step 2 uses at steps 3 and 4
    the rates (and gets the losses) of the uninterrupted run; the rates are the closed form's;
    step 1's rate of 0 reaches the optimizer (the actor does not move: zero KL at step 2)."""
    from dist_utils import run_ranks

    from mcore_rl.toy import build_toy_model

    model = build_toy_model(tmp_path / "model", seed=1)
    full, resumed = run_ranks(_resume_worker, 1, str(tmp_path), model)[0]
    assert [r["step"] for r in full] == [1, 2, 3, 4] and [r["step"] for r in resumed] == [3, 4]
    actor = [closed_form(s, 1e-3, "cosine", 1, STEPS, min_lr=1e-4) for s in range(1, STEPS + 1)]
    critic = [closed_form(s, 1e-3, "linear", 1, STEPS) for s in range(1, STEPS + 1)]
    assert actor[0] == 0 and len(set(actor)) == STEPS and len(set(critic)) == STEPS  # all differ: a shift would show
    for r in full:
        assert math.isclose(r["actor/lr"], actor[r["step"] - 1], rel_tol=1e-12), r
        assert math.isclose(r["critic/lr"], critic[r["step"] - 1], rel_tol=1e-12, abs_tol=1e-15), r
    for r in resumed:
        f = full[r["step"] - 1]
        assert r["actor/lr"] == f["actor/lr"] and r["critic/lr"] == f["critic/lr"], (r["step"], r, f)
        for k in ("reward/mean", "actor/loss", "critic/loss", "actor/kl"):
            assert math.isclose(r[k], f[k], rel_tol=0, abs_tol=1e-6), (r["step"], k, r[k], f[k])
    assert full[1]["actor/kl"] == 0.0 and full[2]["actor/kl"] > 0  # rate 0 at step 1, then it trains
