"""Trainer-level correctness of the advantage and loss paths, each against an independent
float64 NumPy / plain PyTorch computation:

- KL in the reward reaches the outcome estimators (grpo, rloo, reinforce_plus_plus_baseline):
  their score is score - kl_coef * sum of the per-token KL over the response;
- Dr.GRPO ("seq-mean-token-sum-norm") divides each sequence's loss sum by the response budget
  `data.max_response_length`, not by the padded sequence length;
- a group of equal scores gets exactly zero advantage (no float32 rounding residue).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_utils import run_ranks
from mcore_rl.algorithms import apply_kl_in_reward, compute_advantages, grpo, rloo

OUTCOME = ("grpo", "rloo", "reinforce_plus_plus_baseline")


# ---------------------------------------------------------------- NumPy references (float64)

def np_kl(logp, ref, kind):
    d = logp - ref
    if kind in ("kl", "k1"):
        return d
    lr = np.clip(-d, -20, 20)  # low_var_kl / k3
    return np.clip(np.exp(lr) - lr - 1, -10, 10)


def np_outcome_advantages(name, scores, groups, mask, eps=1e-6):
    """[B, T] advantages of an outcome estimator from one score per sample, in float64."""
    scores, groups, mask = np.asarray(scores, np.float64), np.asarray(groups), np.asarray(mask, bool)
    adv = np.zeros(len(scores))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        s = scores[idx]
        n = len(s)
        if name == "reinforce_plus_plus_baseline":
            adv[idx] = s - s.mean()
        elif n == 1:
            adv[idx] = 0.0
        elif name == "grpo":
            adv[idx] = (s - s.mean()) / (s.std(ddof=1) + eps)
        else:  # rloo: score minus the mean of the other samples
            adv[idx] = s - (s.sum() - s) / (n - 1)
    tok = np.where(mask, adv[:, None], 0.0)
    if name == "reinforce_plus_plus_baseline":  # whitened over the valid tokens of the batch
        v = tok[mask]
        tok = np.where(mask, (tok - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8), 0.0)
    return tok


def _batch(seed=0, groups=(0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2), T=7):
    g = torch.Generator().manual_seed(seed)
    B = len(groups)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    scores = torch.randint(0, 3, (B,), generator=g).float() * 0.5
    logp = -torch.rand(B, T, generator=g) * 3
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    return list(groups), mask, scores, logp, ref


def _last_token(scores, mask):
    tr = torch.zeros(mask.shape)
    tr[torch.arange(len(scores)), mask.sum(-1) - 1] = scores
    return tr


# ---------------------------------------------------------------- 1. KL in the reward

@pytest.mark.parametrize("kind", ["kl", "low_var_kl"])
@pytest.mark.parametrize("name", OUTCOME)
def test_outcome_estimators_see_kl_in_reward(name, kind):
    groups, mask, scores, logp, ref = _batch()
    coef = 0.3
    token_rewards, _ = apply_kl_in_reward(_last_token(scores, mask), logp, ref, mask, coef, kind)
    adv, ret = compute_advantages(name, mask=mask, token_rewards=token_rewards, group_index=groups)
    assert ret is None
    m = mask.numpy()
    kl_sum = np.where(m, np_kl(logp.double().numpy(), ref.double().numpy(), kind), 0.0).sum(-1)
    expected = np_outcome_advantages(name, scores.double().numpy() - coef * kl_sum, groups, m)
    np.testing.assert_allclose(adv.double().numpy(), expected, atol=1e-5, rtol=1e-5)
    without = np_outcome_advantages(name, scores.double().numpy(), groups, m)
    assert np.abs(expected - without).max() > 1e-2  # the KL term is visible in this batch


def test_scores_and_token_rewards_together_are_refused():
    groups, mask, scores, _, _ = _batch()
    with pytest.raises(ValueError, match="not both"):
        compute_advantages("grpo", mask=mask, token_rewards=_last_token(scores, mask), scores=scores,
                           group_index=groups)


def _stub_trainer(cfg, shard, logp, ref, captured, monkeypatch):
    """A PPOTrainer whose train_step runs its real advantage code on `shard`, with the models,
    the engine and the update replaced by stubs; the update records the shard it is given."""
    from mcore_rl.trainer import ppo_trainer as pt

    tr = object.__new__(pt.PPOTrainer)
    tr.cfg, tr.bridge = cfg, None  # colocated
    tr.loader = SimpleNamespace(next_batch=lambda: list(range(int(shard.prompt_index.max()) + 1)))
    tr.engine = None
    tr.resharder = SimpleNamespace(sync=lambda engine: {})
    tr._rollout = lambda rows, timing: shard
    tr._reward_metrics = lambda local: {}
    tr._shard = lambda local, order: local
    tr.need_ref = True
    tr.use_critic = False
    tr._shard_metrics = lambda s, m: {"_tokens": 1.0}
    tr.layout = SimpleNamespace(dp=1)
    tr.dp_group = None
    tr.actor, tr.ref, tr.actor_opt = "actor", "ref", None
    tr.step, tr.actor_lr = 1, SimpleNamespace(set_step=lambda step: 0.0)
    monkeypatch.setattr(pt, "compute_logprobs", lambda model, s, micro, max_tokens=None: ({"actor": logp, "ref": ref}[model], None))

    def update(actor, opt, s, cfg, minis, dp_group):
        captured["advantages"] = s.advantages.clone()
        return {}

    monkeypatch.setattr(pt, "update_actor", update)
    return tr


def _shard_from(groups, mask, scores, prompt_len=3):
    """A Shard whose shifted mask is `mask` placed after a prompt of `prompt_len` tokens."""
    from mcore_rl.trainer.batch import Shard

    B, T = mask.shape
    L = prompt_len + T
    lengths = mask.sum(-1)
    return Shard(prompt_index=torch.tensor(groups), sample_index=torch.arange(B),
                 input_ids=torch.ones(B, L, dtype=torch.long), prompt_length=torch.full((B,), prompt_len),
                 response_length=lengths, truncated=torch.zeros(B, dtype=torch.bool), scores=scores,
                 rollout_logprobs=torch.zeros(B, L - 1))


@pytest.mark.parametrize("name", OUTCOME)
def test_train_step_outcome_advantages_include_kl_in_reward(name, monkeypatch):
    from mcore_rl.config import load_config

    groups, mask, scores, logp, ref = _batch(seed=1)
    coef, P = 0.2, 3
    cfg = load_config(None, [f"algorithm.adv_estimator={name}", "algorithm.use_kl_in_reward=true",
                             f"algorithm.kl_ctrl.kl_coef={coef}", "algorithm.kl_penalty=kl"])
    shard = _shard_from(groups, mask, scores, P)
    pad = lambda x: torch.cat([torch.zeros(len(x), P - 1), x], 1)  # noqa: E731 (into the shifted [B, L-1] space)
    assert torch.equal(shard.mask, pad(mask.float()).bool())
    captured = {}
    tr = _stub_trainer(cfg, shard, pad(logp), pad(ref), captured, monkeypatch)
    tr.train_step()
    m = mask.numpy()
    kl_sum = np.where(m, logp.double().numpy() - ref.double().numpy(), 0.0).sum(-1)
    expected = np_outcome_advantages(name, scores.double().numpy() - coef * kl_sum, groups, m)
    got = captured["advantages"][:, P - 1:].double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert np.abs(captured["advantages"][:, :P - 1].numpy()).max() == 0


# ---------------------------------------------------------------- 2. Dr.GRPO's length constant

def _drgrpo_worker(hf_path, max_prompt, max_resp):
    from converters.hf_io import load_hf_into_model
    from megatron.core import parallel_state as ps

    from mcore_rl.config import load_config
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model
    from mcore_rl.models.optim import wrap_for_training
    from mcore_rl.trainer.batch import Sample, pad_batch
    from mcore_rl.trainer.ppo_update import compute_logprobs, update_actor

    init_distributed(1, 1)
    spec = arch_from_hf_config(hf_path)
    model = build_model(spec, role="actor")
    load_hf_into_model(model, spec, hf_path)
    actor, opt = wrap_for_training(model, lr=1e-6)
    cfg = load_config(None, ["actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
                             f"data.max_prompt_length={max_prompt}", f"data.max_response_length={max_resp}",
                             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                             "actor_rollout_ref.actor.ppo_epochs=1", "actor_rollout_ref.actor.entropy_coeff=0",
                             "actor_rollout_ref.actor.use_kl_loss=false"])
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, (p, r) in enumerate([(2, 1), (4, 3), (6, 5), (3, 2)]):
        ids = torch.randint(1, 250, (p + r,), generator=g).tolist()
        samples.append(Sample(i // 2, i % 2, ids[:p], ids[p:], [], "stop", float(i)))
    shard = pad_batch(samples, max_prompt, max_resp, pad_id=0)
    shard.old_logp = compute_logprobs(actor, shard, 2)[0]
    shard.advantages = torch.where(shard.mask, torch.randn(shard.mask.shape, generator=g), torch.zeros(()))
    metrics = update_actor(actor, opt, shard, cfg, [range(0, len(shard))], ps.get_data_parallel_group())
    return metrics["actor/pg_loss"], shard.advantages, shard.mask


def test_drgrpo_policy_loss_uses_the_response_budget(tiny_model_factory):
    max_prompt, max_resp = 8, 6
    pg_loss, adv, mask = run_ranks(_drgrpo_worker, 1, tiny_model_factory("llama"), max_prompt, max_resp)[0]
    # first update of the step: the policy is the rollout policy, ratio 1, loss per token = -A
    a = np.where(mask.numpy(), adv.double().numpy(), 0.0)
    expected = np.mean(-a.sum(-1) / max_resp)
    assert abs(pg_loss - expected) < 1e-5 * max(1.0, abs(expected))
    padded_len = max_prompt + max_resp - 1
    assert abs(expected - np.mean(-a.sum(-1) / padded_len)) > 1e-3  # the two constants are told apart


# ---------------------------------------------------------------- 3. group statistics

@pytest.mark.parametrize("n,value", [(64, 7.3), (16, 2.2), (5, 0.1), (8, 1e6 / 3)])
def test_equal_scores_give_exactly_zero_advantage(n, value):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        scores = torch.full((n,), value, dtype=dtype)
        m = torch.ones(n, 3, dtype=torch.bool)
        for adv in (grpo(scores, [0] * n, m), grpo(scores, [0] * n, m, norm_by_std=False), rloo(scores, [0] * n, m)):
            assert adv.abs().max().item() == 0.0, (dtype, adv.abs().max().item())
        out = compute_advantages("reinforce_plus_plus_baseline", mask=m, scores=scores, group_index=[0] * n)
        assert out[0].abs().max().item() == 0.0


def test_equal_scores_mixed_with_other_groups():
    groups = [0] * 64 + [1] * 16 + [2, 2, 2, 2]
    scores = torch.tensor([7.3] * 64 + [2.2] * 16 + [0.0, 1.0, 0.5, 1.0])
    m = torch.ones(len(groups), 2, dtype=torch.bool)
    for name in ("grpo", "rloo"):
        adv = compute_advantages(name, mask=m, scores=scores, group_index=groups)[0]
        assert adv[:80].abs().max().item() == 0.0
        np.testing.assert_allclose(adv.double().numpy(), np_outcome_advantages(name, scores.double().numpy(),
                                                                               groups, m.numpy()), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", OUTCOME)
def test_group_statistics_match_float64_reference(name, seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 6, size=40)
    scores = rng.normal(3.0, 2.0, size=40).astype(np.float32)
    scores[groups == 0] = np.float32(7.3)  # one group with equal scores
    mask = np.arange(5)[None, :] < rng.integers(1, 6, size=40)[:, None]
    adv = compute_advantages(name, mask=torch.from_numpy(mask), scores=torch.from_numpy(scores),
                             group_index=torch.from_numpy(groups))[0]
    expected = np_outcome_advantages(name, scores.astype(np.float64), groups, mask)
    if name != "reinforce_plus_plus_baseline":
        expected[groups == 0] = 0.0  # exact in float64 too: s - mean = 0
    np.testing.assert_allclose(adv.double().numpy(), expected, atol=1e-6, rtol=1e-6)
