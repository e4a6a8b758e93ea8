"""LoRA rollout through vLLM's adapters (``actor_rollout_ref.rollout.lora_sync=adapter``).

The engine serves a peft-format adapter over its base weights; each sync writes the actor's
adapters and the engine replaces the one it serves. References are independent of our code:
peft's model on the HF base gives the log-probs the engine must return, and in the trainer the
Megatron actor's own log-probs of the sampled tokens (``rollout/logprob_diff_max``) show that the
engine serves the adapters being trained at every step, not the ones of an earlier step.
"""

import json
import os

import pytest
import torch

from test_lora import _peft_model, _random_adapters

pytestmark = pytest.mark.sync
PROMPTS = [[3, 17, 42, 5, 99], [7, 8, 9], [120, 4, 4, 61, 200, 11, 1]]


def _save_peft(base, targets, seed, out):
    """A peft model on the HF base with random adapters (B non-zero), saved to `out`."""
    import peft

    pm = _peft_model(base, targets)
    peft.set_peft_model_state_dict(pm, {f"base_model.model.{k}": v for k, v in _random_adapters(base, targets, seed).items()})
    pm.save_pretrained(str(out))
    return pm.eval()


def _hf_logprobs(model, prompt, tokens) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(prompt)
    return logp[n - 1:-1].gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_engine_serves_peft_adapters_and_replaces_them(tiny_model_factory, tmp_path):
    """Greedy samples and their log-probs from the engine with adapter 1, then with adapter 2 loaded
    in its place (other targets), equal peft's model for each (fp32); without an adapter loaded
    the engine is the base model."""
    from mcore_rl.rollout.base import Sampling
    from mcore_rl.rollout.vllm_engine import VLLMEngine

    base = tiny_model_factory("llama")
    models = [_save_peft(base, "all-linear", 1, tmp_path / "a1"), _save_peft(base, "q_proj,v_proj", 2, tmp_path / "a2")]
    greedy = Sampling(temperature=0, max_tokens=10, ignore_eos=True)
    with VLLMEngine(base, dtype="float32", max_lora_rank=8) as engine:
        assert engine.serves_lora and engine.weight_target().load_adapter is not None
        seen = [engine.generate(PROMPTS, greedy)]
        with models[0].disable_adapter():  # no adapter loaded yet: the base model
            for o in seen[0]:
                torch.testing.assert_close(torch.tensor(o.logprobs), _hf_logprobs(models[0], PROMPTS[o.prompt_index], o.token_ids),
                                           atol=1e-4, rtol=0)
        for k, model in enumerate(models):
            engine.weight_target().load_adapter(str(tmp_path / f"a{k + 1}"))
            engine.reset_prefix_cache()
            outs = engine.generate(PROMPTS, greedy)
            for o in outs:
                want = _hf_logprobs(model, PROMPTS[o.prompt_index], o.token_ids)
                torch.testing.assert_close(torch.tensor(o.logprobs), want, atol=1e-4, rtol=0)
                logits = model(torch.tensor([PROMPTS[o.prompt_index] + o.token_ids])).logits[0, len(PROMPTS[o.prompt_index]) - 1:-1]
                assert o.token_ids == logits.argmax(-1).tolist()  # greedy under peft's model
            seen.append(outs)
    # the adapters change what is generated (a test of something): base, adapter 1 and adapter 2 differ
    tokens = [[o.token_ids for o in outs] for outs in seen]
    assert tokens[0] != tokens[1] and tokens[1] != tokens[2] and tokens[0] != tokens[2]


@pytest.mark.train
def test_adapter_sync_follows_training_at_tp2(tmp_path):
    """The trainer at training TP=2 and rollout TP=2 (vLLM, gloo, 2 ranks, strict collective checks),
    LoRA on every linear, 3 steps at a high learning rate: every step the engine's log-probs of its
    samples equal the actor's own (a stale adapter would be off by the step's KL), the sync moved
    the adapters alone, and the policy moved away from the base."""
    import strict_dist
    from test_strict_dist import TP2, run_trainer

    p, logs = run_trainer(tmp_path, "grpo", TP2 + [
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
        "actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.rollout.lora_sync=adapter",
        "actor_rollout_ref.actor.optim.lr=1e-2", "trainer.max_steps=3"])
    try:
        problems = strict_dist.check_logs(logs, 2) and ""
    except AssertionError as e:
        problems = str(e)
    assert p.returncode == 0 and not problems, f"{problems}\n--- exit code {p.returncode}, output:\n{strict_dist.excerpt(p.stdout)}"
    assert "weight sync: LoRA adapters alone" in p.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows), [r["rollout/logprob_diff_max"] for r in rows]
    assert rows[-1]["actor/kl"] > 0.01, [r["actor/kl"] for r in rows]  # so a stale adapter would have shown
    # the adapters of a rank-8 tiny Llama, whole: r * (in + out) per targeted linear, fp32
    assert rows[0]["sync/bytes"] < 0.5e6, rows[0]["sync/bytes"]


@pytest.mark.parametrize("overrides,msg", [
    (["actor_rollout_ref.rollout.lora_sync=adapter"], "needs a LoRA actor"),
    (["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.rollout.lora_sync=adapter",
      "actor_rollout_ref.rollout.name=hf"], "needs the vLLM engine"),
    (["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.rollout.lora_sync=adapter",
      "actor_rollout_ref.rollout.placement=split", "actor_rollout_ref.rollout.n_gpus=1"], "colocated placement only"),
    (["actor_rollout_ref.rollout.lora_sync=adapters"], "merged"),
])
def test_bad_lora_sync_fails_at_load(overrides, msg):
    from mcore_rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides, world_size=2)


def test_adapter_folders_of_dead_processes_are_removed(tmp_path):
    """A run killed with -9 leaves its adapter folder behind (in /dev/shm: memory); the next run's
    adapter root removes it, and nothing of a live process or not ours."""
    import subprocess
    import sys

    from mcore_rl.resharding import adapter_root

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"mcore_rl_adapter_{gone.pid}_abc"
    (stale / "3").mkdir(parents=True)
    live, other = tmp_path / f"mcore_rl_adapter_{os.getppid()}_def", tmp_path / "mcore_rl_other_1"
    live.mkdir()
    other.mkdir()
    root = adapter_root(str(tmp_path))
    assert not stale.exists() and live.exists() and other.exists()
    assert os.path.basename(root.name).startswith(f"mcore_rl_adapter_{os.getpid()}_")
    root.cleanup()
    assert not os.path.exists(root.name)
