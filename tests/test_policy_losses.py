"""GSPO and CISPO policy losses against NumPy references written from the papers' formulas.

The references work on Python lists of variable-length responses (no masks, no padding) in
float64 and give the loss and its gradient with respect to every token's log-prob in closed form.
"""

import os

import numpy as np
import pytest
import torch

from mcore_rl.algorithms import POLICY_LOSSES, cispo_policy_loss, get_policy_loss, gspo_policy_loss, policy_loss

TOL = 1e-6


def _batch(seed, lengths, T=None, scale=0.3, seq_adv=False):
    """Padded [B, T] float64 tensors + the same data as lists of per-response NumPy arrays.
    Padding holds NaN, so a leak would show."""
    rng = np.random.default_rng(seed)
    T = T or max(lengths) + 2
    B = len(lengths)
    logp = np.full((B, T), np.nan)
    old = np.full((B, T), np.nan)
    adv = np.full((B, T), np.nan)
    mask = np.zeros((B, T), dtype=bool)
    seqs = []
    for i, L in enumerate(lengths):
        o = -rng.uniform(0.1, 3.0, L)
        lp = o + rng.normal(0, scale, L)
        a = np.full(L, rng.normal()) if seq_adv else rng.normal(size=L)
        logp[i, :L], old[i, :L], adv[i, :L], mask[i, :L] = lp, o, a, True
        seqs.append((lp, o, a))
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return t(logp).requires_grad_(True), t(old), t(adv), torch.tensor(mask), seqs


def _grad_matrix(grads, shape):
    g = np.zeros(shape)
    for i, gi in enumerate(grads):
        g[i, : len(gi)] = gi
    return g


def ref_gspo(seqs, low, high):
    """J = 1/G sum_i 1/|y_i| sum_t min(s_i,t A_t, clip(s_i,t) A_t), s_i,t = sg[s_i] pi_t / sg[pi_t].
    Loss -J; d loss / d logp_t = -A_t s_i / (G |y_i|) where the unclipped term is the minimum, else 0."""
    total, grads = 0.0, []
    G = len(seqs)
    for lp, o, a in seqs:
        L = len(lp)
        s = np.exp(np.mean(lp - o))
        unclipped, clipped = s * a, np.clip(s, 1 - low, 1 + high) * a
        total += -np.minimum(unclipped, clipped).sum() / L
        active = unclipped <= clipped  # the unclipped branch is the min (ties: same value and gradient)
        grads.append(np.where(active, -a * s / (G * L), 0.0))
    return total / G, grads


def ref_cispo(seqs, low, high, agg, norm_len=None):
    """Per token -sg[clip(r_t)] A_t logp_t; d/d logp_t = -clip(r_t) A_t times the aggregation weight."""
    n_tok, G = sum(len(s[0]) for s in seqs), len(seqs)
    total, grads = 0.0, []
    for lp, o, a in seqs:
        w = np.clip(np.exp(lp - o), 1 - low, 1 + high)
        per = -w * a * lp
        dper = -w * a
        k = {"token-mean": 1 / n_tok, "seq-mean-token-mean": 1 / (G * len(lp)),
             "seq-mean-token-sum": 1 / G, "seq-mean-token-sum-norm": 1 / (G * norm_len)}[agg]
        total += k * per.sum()
        grads.append(k * dper)
    return total, grads


LENGTHS = [1, 3, 7, 12, 5, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("low,high,scale", [(0.2, 0.28, 0.3), (3e-4, 4e-4, 0.01), (0.05, 0.05, 0.1)])
@pytest.mark.parametrize("seq_adv", [False, True])
def test_gspo_matches_reference(seed, low, high, scale, seq_adv):
    logp, old, adv, mask, seqs = _batch(seed, LENGTHS, scale=scale, seq_adv=seq_adv)
    loss, metrics = gspo_policy_loss(logp, old, adv, mask, clip_low=low, clip_high=high)
    want, grads = ref_gspo(seqs, low, high)
    assert abs(loss.item() - want) < TOL
    loss.backward()
    np.testing.assert_allclose(logp.grad.numpy(), _grad_matrix(grads, logp.shape), atol=TOL, rtol=0)
    # the ratio's value is the sequence ratio on every token
    s = np.concatenate([np.full(len(lp), np.exp(np.mean(lp - o))) for lp, o, _ in seqs])
    assert abs(metrics["ratio_mean"].item() - s.mean()) < TOL


def test_gspo_ignores_agg_and_takes_a_sequence_denominator():
    logp, old, adv, mask, seqs = _batch(3, LENGTHS)
    base, _ = gspo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        other, _ = gspo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, agg=agg, norm_len=99)
        assert abs(other.item() - base.item()) < 1e-12
    # denominator = sequences over the whole mini-batch (e.g. 4x as many on other ranks)
    scaled, _ = gspo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2,
                                 denominator=4.0 * len(LENGTHS))
    assert abs(scaled.item() - base.item() / 4) < 1e-12


def test_gspo_equals_vanilla_ppo_on_one_token_responses():
    logp, old, adv, mask, _ = _batch(4, [1] * 8, T=3, scale=0.4)
    gspo, gm = gspo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    (g1,) = torch.autograd.grad(gspo, logp)
    ppo, pm = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    (g2,) = torch.autograd.grad(ppo, logp)
    assert abs(gspo.item() - ppo.item()) < TOL
    torch.testing.assert_close(g1, g2, atol=TOL, rtol=0)
    assert gm["clipfrac"].item() == pm["clipfrac"].item() > 0  # some tokens really are clipped


def test_gspo_token_gradient_is_sequence_ratio_times_advantage_over_length():
    """Unclipped: d loss / d logp_t = -s_i * A / |y_i| (one response, so G = 1), whatever the token's own ratio."""
    L = 6
    logp, old, adv, mask, seqs = _batch(5, [L], T=9, scale=0.5, seq_adv=True)
    loss, m = gspo_policy_loss(logp, old, adv, mask, clip_low=10.0, clip_high=10.0)  # never clipped
    loss.backward()
    lp, o, a = seqs[0]
    s = np.exp(np.mean(lp - o))
    np.testing.assert_allclose(logp.grad[0, :L].numpy(), -s * a / L, atol=TOL, rtol=0)
    assert torch.all(logp.grad[0, L:] == 0)
    assert m["clipfrac"].item() == 0
    # the per-token ratios differ a lot, the gradient does not: only s_i counts
    assert np.ptp(np.exp(lp - o)) > 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("low,high", [(0.2, 0.28), (1.0, 0.5)])
def test_cispo_matches_reference(seed, agg, low, high):
    logp, old, adv, mask, seqs = _batch(seed, LENGTHS, scale=0.4)
    loss, metrics = cispo_policy_loss(logp, old, adv, mask, clip_low=low, clip_high=high, agg=agg, norm_len=16)
    want, grads = ref_cispo(seqs, low, high, agg, norm_len=16)
    assert abs(loss.item() - want) < TOL
    loss.backward()
    np.testing.assert_allclose(logp.grad.numpy(), _grad_matrix(grads, logp.shape), atol=TOL, rtol=0)
    r = np.concatenate([np.exp(lp - o) for lp, o, _ in seqs])
    clipped = (r < 1 - low) | (r > 1 + high)
    assert abs(metrics["clipfrac"].item() - clipped.mean()) < TOL


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """Ratios outside the range: vanilla PPO's gradient is 0 there, CISPO's is -clip(r) * A / N."""
    logp, old, adv, mask, seqs = _batch(6, [4, 6, 3], scale=0.8)
    r = torch.exp(logp - old).detach()
    low = high = 0.1
    out = mask & ((r < 1 - low) | (r > 1 + high))
    ppo, _ = policy_loss(logp, old, adv, mask, clip_low=low, clip_high=high)
    (g_ppo,) = torch.autograd.grad(ppo, logp)
    cispo, _ = cispo_policy_loss(logp, old, adv, mask, clip_low=low, clip_high=high)
    (g_cispo,) = torch.autograd.grad(cispo, logp)
    # PPO's zero gradient: the clipped branch is the max, i.e. the move was in the advantage's direction
    dropped = out & ((adv > 0) & (r > 1 + high) | (adv < 0) & (r < 1 - low))
    assert dropped.sum() >= 2
    assert torch.all(g_ppo[dropped] == 0)
    assert torch.all(g_cispo[out].abs() > 0)
    w = r.clamp(1 - low, 1 + high)
    torch.testing.assert_close(g_cispo[out], (-w * adv / mask.sum())[out], atol=TOL, rtol=0)


def test_registry_and_same_metrics():
    assert set(POLICY_LOSSES) == {"vanilla", "gspo", "cispo"}
    assert get_policy_loss("vanilla") is policy_loss
    with pytest.raises(ValueError, match="unknown policy loss"):
        get_policy_loss("sapo")
    logp, old, adv, mask, _ = _batch(7, LENGTHS)
    keys = set(policy_loss(logp, old, adv, mask)[1])
    for name in ("gspo", "cispo"):
        loss, m = get_policy_loss(name)(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip_c=3.0,
                                        agg="token-mean", denominator=None, norm_len=None)
        assert set(m) == keys and loss.dim() == 0 and torch.isfinite(loss)
        assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_policy_loss_config_key():
    from mcore_rl.config import ConfigError, load_config

    assert load_config(None, []).actor_rollout_ref.actor.policy_loss == "vanilla"
    assert load_config(None, ["actor_rollout_ref.actor.policy_loss=gspo"]).actor_rollout_ref.actor.policy_loss == "gspo"
    with pytest.raises(ConfigError):
        load_config(None, ["actor_rollout_ref.actor.policy_loss=sapo"])


def _fit(out, mode):
    """A 2-step GRPO run on the toy task with policy loss `mode`: its metrics, step by step."""
    from mcore_rl.config import load_config
    from mcore_rl.trainer.ppo_trainer import PPOTrainer

    preset = os.path.join(os.path.dirname(__file__), "..", "configs", "grpo.yaml")
    clip = ["actor_rollout_ref.actor.clip_ratio_low=3e-4", "actor_rollout_ref.actor.clip_ratio_high=4e-4"] \
        if mode == "gspo" else []
    args = ["data.dataset_name=toy", "data.max_prompt_length=8", "data.max_response_length=8",
            "actor_rollout_ref.rollout.name=hf", "trainer.max_steps=2", "data.train_batch_size=8",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.actor.ppo_epochs=2", f"actor_rollout_ref.actor.policy_loss={mode}",
            "trainer.logger=[console]", "trainer.export_hf_at_end=false", f"trainer.output_dir={out}",
            f"trainer.save_at_end={mode != 'gspo'}"] + clip  # (and checks that save_at_end=false saves nothing)
    trainer = PPOTrainer(load_config(preset, args))
    try:
        rows = trainer.fit()
    finally:
        trainer.close()
    ckpt = os.path.join(out, "checkpoints")
    return rows, sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []


@pytest.fixture(scope="module")
def policy_loss_runs(request, tmp_path_factory):
    """{mode: metrics rows} of the selected modes' runs, one world-of-one process for all."""
    from dist_utils import in_turn, run_ranks, selected

    root = tmp_path_factory.mktemp("policy_loss_runs")
    modes = sorted({p["mode"] for p in selected(request, "test_trainer_runs_with_policy_loss").values()})
    return run_ranks(in_turn, 1, {m: (_fit, (str(root / m), m)) for m in modes})[0]


@pytest.mark.train
@pytest.mark.parametrize("mode", ["gspo", "cispo"])
def test_trainer_runs_with_policy_loss(mode, policy_loss_runs):
    rows, checkpoints = policy_loss_runs[mode]
    assert [r["step"] for r in rows] == [1, 2]
    assert checkpoints == ([] if mode == "gspo" else ["latest", "step_00000002"])  # gspo's run: trainer.save_at_end=false
    if mode == "gspo":  # second PPO epoch is off-policy: GSPO's tiny range clips some responses
        assert max(r["actor/pg_clipfrac"] for r in rows) > 0
    for r in rows:
        for k in ("actor/loss", "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl"):
            assert np.isfinite(r[k]), (k, r)
