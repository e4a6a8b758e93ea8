"""The weight-update protocol, owned by `RolloutEngine.update_weights` and `release`: wake the
weights -> load -> wake the KV cache -> reset the prefix cache -> generate -> sleep, in one
engine call each, and the trainer (training steps and validation) going through them.

The engine is the real transformers engine with vLLM's sleep mode reproduced in host memory: a
level-2 sleep overwrites the weights with NaN and drops the KV cache, loading needs the weights
awake, generating needs both awake and the prefix cache reset after the last load; every call
is recorded. vLLM's own sleep mode only runs on GPU (the GPU tests cover it)."""

from __future__ import annotations

import glob
import inspect
import os

import pytest
import torch
from safetensors.torch import load_file

from mcore_rl.rollout.hf_engine import HFEngine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPDATE = ["wake:weights", "load", "wake:kv_cache", "reset_prefix_cache"]


class SleepingHF(HFEngine):
    """The transformers engine with a sleep mode whose broken uses fail (see module doc)."""

    sleep_enabled = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[str] = []
        self.awake = {"weights", "kv_cache"}
        self.prefix_fresh = True  # the prefix cache holds nothing computed with other weights

    def sleep(self, level: int = 1) -> None:
        self.events.append(f"sleep:{level}")
        self.awake = set()
        if level == 2:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags=None) -> None:
        for tag in tags or ["weights", "kv_cache"]:
            if tag not in self.awake:
                self.events.append(f"wake:{tag}")
                self.awake.add(tag)

    def _load_hf(self, weights) -> None:
        assert "weights" in self.awake, "weights loaded into a sleeping engine"
        self.events.append("load")
        super()._load_hf(weights)
        self.prefix_fresh = False

    def reset_prefix_cache(self) -> None:
        assert "kv_cache" in self.awake, "prefix cache reset before the KV cache is awake"
        self.events.append("reset_prefix_cache")
        self.prefix_fresh = True

    def generate(self, prompt_token_ids, sampling=None):
        assert self.awake == {"weights", "kv_cache"}, f"generate while {self.awake or 'nothing'} is awake"
        assert self.prefix_fresh, "generate with a prefix cache from the old weights"
        self.events.append("generate")
        return super().generate(prompt_token_ids, sampling)


def _checkpoint(path):
    out = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(f))
    return out


def test_update_weights_orders_wake_load_wake_reset(tiny_model_factory):
    from mcore_rl.rollout import Sampling

    path = tiny_model_factory("llama")
    engine = SleepingHF(path)
    weights = _checkpoint(path)
    engine.release()  # as after a rollout: weights and KV cache dropped
    engine.events.clear()
    stats = engine.update_weights(lambda target: target.load_hf(weights.items()) or {"sync/tensors": len(weights)})
    assert engine.events == UPDATE
    assert set(stats) == {"timing/wake", "timing/sync", "sync/prefix_reset_s", "sync/tensors"}
    engine.generate([[1, 2, 3]], Sampling(temperature=0, max_tokens=4))
    assert engine.release().keys() == {"timing/sleep"}
    assert engine.events == UPDATE + ["generate", "sleep:2"]
    with pytest.raises(AssertionError, match="nothing is awake"):
        engine.generate([[1, 2, 3]])
    engine.events.clear()
    engine.load_weights(weights.items())  # the one-call form takes the same path
    assert engine.events == UPDATE
    params = engine.model.state_dict()
    assert all(torch.equal(params[k], v) for k, v in weights.items())  # the NaNs of the sleep are gone


def _trainer_worker(out):
    import mcore_rl.trainer.build as build
    from mcore_rl.config import load_config
    from mcore_rl.toy import build_toy_model
    from mcore_rl.trainer.ppo_trainer import PPOTrainer

    accepted = inspect.signature(HFEngine.__init__).parameters
    build.make_engine = lambda name, **kw: SleepingHF(**{k: v for k, v in kw.items() if k in accepted})
    model = build_toy_model(os.path.join(out, "model"), seed=1)
    cfg = load_config(os.path.join(REPO, "configs", "toy_grpo.yaml"), [
        "data.train_batch_size=4", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.rollout.name=hf", "trainer.max_steps=2", "trainer.test_freq=2", "data.val_files=toy",
        "trainer.logger=[console]", "trainer.resume=off", f"actor_rollout_ref.model.path={model}",
        f"trainer.output_dir={out}/run"])
    tr = PPOTrainer(cfg)
    history = tr.fit()
    events = tr.engine.events
    tr.close()
    return events, history


@pytest.mark.train
def test_trainer_and_validation_follow_the_protocol(tmp_path):
    """Every rollout (2 training steps, validation at step 0 and 2) is one update, one generate,
    one sleep, in that order; the trainer logs the protocol's timings."""
    from dist_utils import run_ranks

    events, history = run_ranks(_trainer_worker, 1, str(tmp_path))[0]
    cycle = UPDATE + ["generate", "sleep:2"]
    first = ["load", "reset_prefix_cache", "generate", "sleep:2"]  # the new engine is awake
    assert events == first + cycle * 3, events  # validation at step 0, step 1, step 2 and its validation
    for row in history[1:]:
        assert {"timing/wake", "timing/sync", "timing/sleep", "sync/seconds", "sync/fast"} <= set(row), sorted(row)
