"""Rollout/training mismatch correction: importance weights, rejections, metrics and the weighted
policy losses against NumPy references; a real vLLM toy run where the engine samples at another
temperature than the trainer's on purpose.

The references work on Python lists of per-response float64 arrays (no masks, no padding);
the tensors under test are padded with NaN, so a leak from padding would show.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from mcore_rl.algorithms import (
    cispo_policy_loss,
    gspo_policy_loss,
    mismatch_metrics,
    mismatch_sums,
    policy_loss,
    rollout_is_weights,
)

TOL = 1e-9


def _batch(seed, lengths, spread=0.6):
    """(old, rollout, logp, adv) as padded [B, T] float64 tensors with NaN padding, the mask,
    and the same data as per-response arrays."""
    rng = np.random.default_rng(seed)
    B, T = len(lengths), max(lengths) + 2
    arrays = {k: np.full((B, T), np.nan) for k in ("old", "roll", "logp", "adv")}
    mask = np.zeros((B, T), dtype=bool)
    seqs = []
    for i, L in enumerate(lengths):
        roll = -rng.uniform(0.05, 3.0, L)
        old = roll + rng.normal(0, spread, L)
        if i == 1:
            old[L // 2] = roll[L // 2] - 12.0  # a token the trainer finds nearly impossible (veto)
        logp = old + rng.normal(0, 0.3, L)
        adv = rng.normal(size=L)
        for k, v in zip(("old", "roll", "logp", "adv"), (old, roll, logp, adv)):
            arrays[k][i, :L] = v
        mask[i, :L] = True
        seqs.append(dict(old=old, roll=roll, logp=logp, adv=adv))
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}
    return t, torch.tensor(mask), seqs


LENGTHS = [5, 9, 1, 7, 3, 12, 2, 6]


def ref_weights(seqs, upper, lower, level, mode, veto):
    """Per response: (weights, kept) arrays, from the definitions."""
    lower = 1.0 / upper if lower is None else lower
    out = []
    for s in seqs:
        d = s["old"] - s["roll"]
        if level == "token":
            lw = d
        elif level == "sequence":
            lw = np.full_like(d, d.sum())
        else:
            lw = np.full_like(d, d.mean())
        w = np.exp(np.clip(lw, -20, 20))
        if mode == "truncate":
            w, keep = np.minimum(w, upper), np.ones(len(d), dtype=bool)
        else:
            keep = (w >= lower) & (w <= upper)
        if veto is not None and (np.exp(d) < veto).any():
            keep[:] = False
        out.append((np.where(keep, w, 0.0), keep))
    return out


CASES = [(level, mode, veto) for level in ("token", "sequence", "geometric") for mode in ("truncate", "mask")
         for veto in (None, 1e-4)]


@pytest.mark.parametrize("level,mode,veto", CASES)
def test_weights_and_rejections_match_reference(level, mode, veto):
    t, mask, seqs = _batch(0, LENGTHS)
    upper, lower = 1.5, 0.6
    w, keep = rollout_is_weights(t["old"], t["roll"], mask, upper, lower, level, mode, veto)
    ref = ref_weights(seqs, upper, lower, level, mode, veto)
    assert not torch.isnan(w).any()
    assert not (keep & ~mask).any()
    for i, (rw, rk) in enumerate(ref):
        L = len(rw)
        np.testing.assert_allclose(w[i, :L].numpy(), rw, rtol=1e-12, atol=0)
        assert keep[i, :L].tolist() == rk.tolist(), (i, level, mode)
        assert (w[i, L:] == 0).all()
    if veto is not None:
        assert not keep[1].any()  # the sequence holding the near-impossible token is rejected
    if mode == "mask":
        assert keep.sum() < mask.sum() and keep.any()  # something rejected, something kept
    else:
        assert float(w.max()) == upper  # something truncated


def test_lower_bound_defaults_to_reciprocal():
    t, mask, seqs = _batch(1, LENGTHS)
    w, keep = rollout_is_weights(t["old"], t["roll"], mask, 2.0, None, "token", "mask")
    ref = ref_weights(seqs, 2.0, 0.5, "token", "mask", None)
    for i, (rw, rk) in enumerate(ref):
        assert keep[i, :len(rk)].tolist() == rk.tolist()


def test_extreme_sequence_ratio_compared_in_log_space():
    """A sequence whose summed log-ratio is far past exp's range: masked, no inf or NaN."""
    old = torch.tensor([[-1.0] * 40])
    roll = torch.tensor([[-3.5] * 40])  # log-ratio sum +100
    mask = torch.ones(1, 40, dtype=torch.bool)
    w, keep = rollout_is_weights(old, roll, mask, 2.0, None, "sequence", "mask")
    assert not keep.any() and torch.isfinite(w).all()
    w, keep = rollout_is_weights(old, roll, mask, 2.0, None, "sequence", "truncate")
    assert keep.all() and torch.equal(w, torch.full_like(w, 2.0))


@pytest.mark.parametrize("mode,level", [("truncate", "token"), ("mask", "token"), ("mask", "sequence"),
                                        ("truncate", "geometric")])
def test_mismatch_metrics_match_reference(mode, level):
    t, mask, seqs = _batch(2, LENGTHS)
    upper = 1.3
    sums, lo, hi = mismatch_sums(t["old"], t["roll"], mask, upper, None, level, mode, 1e-4)
    m = mismatch_metrics(sums, lo, hi, with_is=True)
    d = np.concatenate([s["old"] - s["roll"] for s in seqs])
    r = np.exp(d)
    ref = ref_weights(seqs, upper, None, level, mode, 1e-4)
    w, keep = np.concatenate([x[0] for x in ref]), np.concatenate([x[1] for x in ref])
    raw = np.concatenate([np.exp(np.clip({"token": s["old"] - s["roll"],
                                          "sequence": np.full(len(s["old"]), (s["old"] - s["roll"]).sum()),
                                          "geometric": np.full(len(s["old"]), (s["old"] - s["roll"]).mean())}[level],
                                         -20, 20)) for s in seqs])
    want = {"mismatch/kl": np.mean(-d), "mismatch/k3_kl": np.mean(r - d - 1), "mismatch/ratio_mean": r.mean(),
            "mismatch/ratio_min": r.min(), "mismatch/ratio_max": r.max(), "mismatch/is_weight_mean": w.mean(),
            "mismatch/truncated_fraction": np.mean(keep & (raw > upper)) if mode == "truncate" else 0.0,
            "mismatch/masked_fraction": np.mean(~keep),
            "mismatch/rejected_seq_fraction": np.mean([not x[1].any() for x in ref])}
    assert sorted(m) == sorted(want)
    for k, v in want.items():
        assert math.isclose(m[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, m[k], v)
    assert m["mismatch/rejected_seq_fraction"] > 0  # the veto at least
    # without a threshold: only the mismatch itself
    m0 = mismatch_metrics(*mismatch_sums(t["old"], t["roll"], mask), with_is=False)
    assert sorted(m0) == ["mismatch/k3_kl", "mismatch/kl", "mismatch/ratio_max", "mismatch/ratio_mean",
                          "mismatch/ratio_min"]


# ---------------------------------------------------------------- the weighted policy losses
def ref_vanilla(seqs, ws, keeps, lo, hi):
    """token-mean over kept tokens of w * max(-A r, -A clip(r)); d/dlogp = -w A r / N where the
    unclipped branch is the max, else 0."""
    N = sum(k.sum() for k in keeps)
    total, grads = 0.0, []
    for s, w, k in zip(seqs, ws, keeps):
        r = np.exp(s["logp"] - s["old"])
        a = s["adv"]
        un, cl = -a * r, -a * np.clip(r, 1 - lo, 1 + hi)
        total += np.sum(np.where(k, w * np.maximum(un, cl), 0.0))
        grads.append(np.where(k & (un >= cl), -w * a * r / N, 0.0))
    return total / N, grads


def ref_gspo(seqs, ws, keeps, lo, hi):
    """1/G sum_i 1/|y_i| sum_t w_t max(-A s_i, -A clip(s_i)) over kept tokens, s_i = exp(mean_t(logp - old))."""
    live = [(s, w, k) for s, w, k in zip(seqs, ws, keeps) if k.any()]
    G = len(live)
    total, grads = 0.0, []
    for s, w, k in zip(seqs, ws, keeps):
        if not k.any():
            grads.append(np.zeros(len(k)))
            continue
        L = k.sum()
        si = np.exp(np.sum(np.where(k, s["logp"] - s["old"], 0.0)) / L)
        a = s["adv"]
        un, cl = -a * si, -a * np.clip(si, 1 - lo, 1 + hi)
        total += np.sum(np.where(k, w * np.maximum(un, cl), 0.0)) / L
        grads.append(np.where(k & (un >= cl), -w * a * si / (G * L), 0.0))
    return total / G, grads


def ref_cispo(seqs, ws, keeps, lo, hi):
    """token-mean over kept tokens of -w sg[clip(r)] A logp; d/dlogp = -w clip(r) A / N."""
    N = sum(k.sum() for k in keeps)
    total, grads = 0.0, []
    for s, w, k in zip(seqs, ws, keeps):
        c = np.clip(np.exp(s["logp"] - s["old"]), 1 - lo, 1 + hi)
        total += np.sum(np.where(k, -w * c * s["adv"] * s["logp"], 0.0))
        grads.append(np.where(k, -w * c * s["adv"] / N, 0.0))
    return total / N, grads


@pytest.mark.parametrize("name,fn,ref,agg,clip", [
    ("vanilla", policy_loss, ref_vanilla, "token-mean", (0.2, 0.28)),
    ("gspo", gspo_policy_loss, ref_gspo, "seq-mean-token-mean", (0.05, 0.05)),
    ("cispo", cispo_policy_loss, ref_cispo, "token-mean", (0.2, 0.28)),
])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_weighted_policy_losses_match_reference(name, fn, ref, agg, clip, mode):
    """The loss and its gradient with the weights and the loss mask (kept tokens) the trainer
    passes: the weight multiplies each token's clipped loss, rejected tokens are out of the
    numerator and the denominator."""
    t, mask, seqs = _batch(3, LENGTHS)
    w, keep = rollout_is_weights(t["old"], t["roll"], mask, 1.4, 0.7, "token", mode, 1e-4)
    ref_w = ref_weights(seqs, 1.4, 0.7, "token", mode, 1e-4)
    logp = t["logp"].clone().requires_grad_(True)
    loss, _ = fn(logp, t["old"], t["adv"], keep, clip_low=clip[0], clip_high=clip[1], agg=agg, is_weights=w)
    loss.backward()
    want, grads = ref(seqs, [x[0] for x in ref_w], [x[1] for x in ref_w], *clip)
    assert math.isclose(float(loss), want, rel_tol=1e-10, abs_tol=TOL), (float(loss), want)
    g = logp.grad
    for i, gi in enumerate(grads):
        np.testing.assert_allclose(g[i, :len(gi)].numpy(), gi, rtol=1e-9, atol=1e-12)
        assert (g[i, len(gi):] == 0).all()
    # and the weights change the loss (the test would see them dropped)
    plain, _ = fn(t["logp"], t["old"], t["adv"], keep, clip_low=clip[0], clip_high=clip[1], agg=agg)
    assert abs(float(plain) - want) > 1e-3


def test_weights_get_no_gradient():
    t, mask, _ = _batch(4, LENGTHS)
    w, keep = rollout_is_weights(t["old"], t["roll"], mask, 1.4)
    w = w.clone().requires_grad_(True)
    loss, _ = policy_loss(t["logp"].clone().requires_grad_(True), t["old"], t["adv"], keep, is_weights=w)
    loss.backward()
    assert w.grad is None or not w.grad.any()


def test_config_checks():
    from mcore_rl.config import ConfigError, load_config

    cfg = load_config(None, [])
    assert cfg.algorithm.rollout_is is False  # off by default (the threshold's metrics are still logged)
    for bad, msg in ((["algorithm.rollout_is=true", "algorithm.rollout_is_threshold=null"], "cannot be null"),
                     (["algorithm.rollout_is_mode=clip"], "truncate, mask"),
                     (["algorithm.rollout_is_level=seq"], "token, sequence, geometric"),
                     (["algorithm.rollout_is_threshold=0"], "must be a number > 0"),
                     (["algorithm.rollout_is_threshold=2", "algorithm.rollout_is_threshold_lower=3"], "is above"),
                     (["actor_rollout_ref.rollout.logprobs_mode=processed"], "raw_logprobs, processed_logprobs")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, bad)


# ---------------------------------------------------------------- a real run: vLLM samples at temperature 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["data.train_batch_size=8", "data.max_prompt_length=8", "data.max_response_length=8",
       "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
       "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "actor_rollout_ref.actor.use_kl_loss=false",
       "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.temperature=2.0",
       "trainer.logger=[console]", "trainer.export_hf_at_end=false", "trainer.resume=off"]
SETTINGS = {
    "raw": ["actor_rollout_ref.rollout.logprobs_mode=raw_logprobs"],
    "tis": ["actor_rollout_ref.rollout.logprobs_mode=processed_logprobs", "algorithm.rollout_is=true",
            "algorithm.rollout_is_threshold=1.2"],
    "seq_mis": ["actor_rollout_ref.rollout.logprobs_mode=processed_logprobs", "algorithm.rollout_is=true",
                "algorithm.rollout_is_threshold=2.0", "algorithm.rollout_is_level=sequence",
                "algorithm.rollout_is_mode=mask"],
}


def _run_worker(out):
    import mcore_rl.trainer.ppo_trainer as pt
    from mcore_rl.config import load_config
    from mcore_rl.toy import build_toy_model

    model = build_toy_model(os.path.join(out, "model"), seed=1)
    results = {}
    for name, extra in SETTINGS.items():
        cfg = load_config(os.path.join(REPO, "configs", "toy_grpo.yaml"),
                          RUN + extra + [f"actor_rollout_ref.model.path={model}", f"trainer.output_dir={out}/{name}"])
        tr = pt.PPOTrainer(cfg)
        cap = {}
        original = pt.update_actor

        def update_actor(actor, opt, shard, cfg, minis, group, cap=cap):
            cap["shard"] = shard
            return original(actor, opt, shard, cfg, minis, group)

        pt.update_actor = update_actor
        tr.step = 1
        metrics = tr.train_step()
        pt.update_actor = original
        tr.close()
        s = cap["shard"]
        results[name] = dict(metrics=metrics, old=s.old_logp, roll=s.rollout_logprobs, mask=s.mask, adv=s.advantages)
    return results


@pytest.mark.train
def test_toy_run_with_rollout_temperature_mismatch(tmp_path):
    """vLLM samples at temperature 2. With raw log-probs (the model's own distribution) the engine
    and the trainer agree to float noise; with the processed ones (what was sampled from) they
    differ, and the step's mismatch metrics and policy loss equal the references computed here
    from the step's own log-probs: token TIS at 1.2, sequence-level masking in [0.5, 2]."""
    from dist_utils import run_ranks

    res = run_ranks(_run_worker, 1, str(tmp_path))[0]
    raw = res["raw"]["metrics"]
    assert raw["mismatch/k3_kl"] < 1e-8 and abs(raw["mismatch/ratio_max"] - 1) < 1e-4, raw
    assert raw["mismatch/truncated_fraction"] == 0 and raw["mismatch/masked_fraction"] == 0  # default threshold 2
    for name, level, mode, upper in (("tis", "token", "truncate", 1.2), ("seq_mis", "sequence", "mask", 2.0)):
        r = res[name]
        m = r["metrics"]
        print(name, {k: round(v, 4) for k, v in m.items() if k.startswith("mismatch") or k == "actor/pg_loss"})
        mask = r["mask"]
        seqs = [dict(old=r["old"][i][mask[i]].double().numpy(), roll=r["roll"][i][mask[i]].double().numpy(),
                     adv=r["adv"][i][mask[i]].double().numpy()) for i in range(len(mask))]
        d = np.concatenate([s["old"] - s["roll"] for s in seqs])
        assert m["mismatch/k3_kl"] > 0.02, m  # the engine and the trainer differ on purpose
        assert math.isclose(m["mismatch/k3_kl"], np.mean(np.exp(d) - d - 1), rel_tol=1e-6)
        ref = ref_weights(seqs, upper, None, level, mode, None)
        w, keep = [x[0] for x in ref], [x[1] for x in ref]
        # one mini-batch, one epoch: the policy's log-probs are the old ones (ratio 1, no clip), so
        # the policy loss is the token mean over kept tokens of -w * A
        want = -sum((wi * s["adv"]).sum() for wi, s in zip(w, seqs)) / sum(k.sum() for k in keep)
        assert math.isclose(m["actor/pg_loss"], want, rel_tol=1e-4, abs_tol=1e-6), (name, m["actor/pg_loss"], want)
        if mode == "truncate":
            assert 0 < m["mismatch/truncated_fraction"] < 1, m
        else:
            assert 0 < m["mismatch/rejected_seq_fraction"] < 1, m
            assert math.isclose(m["mismatch/rejected_seq_fraction"], np.mean([not k.any() for k in keep]))
