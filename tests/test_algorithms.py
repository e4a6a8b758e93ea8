"""Advantage estimators, losses, KL estimators and DAPO filters against hand arithmetic or
plain-Python reference loops."""

import math
import statistics
import time

import pytest
import torch

from mcore_rl.algorithms import (
    ADV_ESTIMATORS,
    AGG_MODES,
    agg_loss,
    apply_kl_in_reward,
    compute_advantages,
    entropy_from_logits,
    filter_zero_variance_groups,
    gae,
    grpo,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_whiten,
    overlong_penalty,
    policy_loss,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    rloo,
    value_loss,
)

pytestmark = pytest.mark.train

NAN = float("nan")


def close(a, b, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=atol, rtol=0)


# ---------------------------------------------------------------- plain-Python references

def ref_whiten(rows, masks):
    """Unbiased whitening over valid positions of a list of lists; padding -> 0."""
    flat = [x for r, m in zip(rows, masks) for x, v in zip(r, m) if v]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) if v else 0.0 for x, v in zip(r, m)] for r, m in zip(rows, masks)]


def ref_gae(rewards, values, masks, gamma, lam):
    """GAE over the valid tokens only, ignoring masked ones entirely."""
    advs, rets = [], []
    for r, v, m in zip(rewards, values, masks):
        a, ret = [0.0] * len(r), [0.0] * len(r)
        valid = [t for t in range(len(r)) if m[t]]
        last, next_v = 0.0, 0.0
        for t in reversed(valid):
            delta = r[t] + gamma * next_v - v[t]
            last = delta + gamma * lam * last
            a[t], ret[t] = last, last + v[t]
            next_v = v[t]
        advs.append(a)
        rets.append(ret)
    return ref_whiten(advs, masks), rets


def random_batch(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 3, 5, 1])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return g, mask


# ---------------------------------------------------------------- utils

def test_masked_mean_sum_ignore_nan_padding():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, NAN, NAN]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(x, m), 7.0)
    close(masked_mean(x, m), 7.0 / 3)
    close(masked_mean(x, m, dim=-1), [1.5, 4.0])
    close(masked_mean(x, torch.zeros_like(m)), 0.0)  # empty -> 0, not NaN


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, NAN]])
    m = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased var ((-1)^2 + 0 + 1^2) / (3 - 1) = 1
    close(masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]])
    close(masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


def _whiten_worker(rank, world, tmp, xs, ms):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", world), rank=rank, world_size=world)
    torch.save(masked_whiten(xs[rank], ms[rank], group=dist.group.WORLD), f"{tmp}/out{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_masked_whiten_across_ranks_equals_whole_batch(tmp_path):
    """In SPMD each rank holds a shard; with a group the stats must be batch-wide."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g)
    m = torch.rand(4, 6, generator=g) > 0.3
    xs, ms = list(x.chunk(2)), list(m.chunk(2))
    # fork: a spawned interpreter would re-import torch and cost seconds
    ctx = mp.start_processes(_whiten_worker, args=(2, str(tmp_path), xs, ms), nprocs=2, start_method="fork",
                             join=False)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers did not finish in 60 s")
    sharded = torch.cat([torch.load(tmp_path / f"out{r}.pt") for r in range(2)])
    close(sharded, masked_whiten(x, m))
    local = torch.cat([masked_whiten(xs[0], ms[0]), masked_whiten(xs[1], ms[1])])
    assert not torch.allclose(local, sharded)  # per-shard whitening really is different


# ---------------------------------------------------------------- GAE

def test_gae_by_hand():
    # gamma = lam = 0.5, r = [0, 1], V = [0.5, 0.2], then one padded slot holding junk
    # t=1: delta = 1 + 0.5*0 - 0.2 = 0.8;          A1 = 0.8
    # t=0: delta = 0 + 0.5*0.2 - 0.5 = -0.4;       A0 = -0.4 + 0.25*0.8 = -0.2
    # returns = A + V = [0.3, 1.0]; whitened: mean 0.3, var (0.25 + 0.25)/1 = 0.5
    r = torch.tensor([[0.0, 1.0, NAN]])
    v = torch.tensor([[0.5, 0.2, NAN]])
    m = torch.tensor([[True, True, False]])
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5)
    close(ret, [[0.3, 1.0, 0.0]])
    s = math.sqrt(0.5)
    close(adv, [[-0.5 / s, 0.5 / s, 0.0]])


def test_gae_matches_python_loop_with_padding_and_holes():
    g, m = random_batch()
    m[0, 2] = False  # a hole mid-sequence (e.g. tool output): skipped, credit flows across it
    r = torch.randn(m.shape, generator=g, dtype=torch.float64)
    v = torch.randn(m.shape, generator=g, dtype=torch.float64)
    r_junk = torch.where(m, r, torch.full_like(r, NAN))  # padding may hold anything
    v_junk = torch.where(m, v, torch.full_like(v, 1e6))
    adv, ret = gae(r_junk, v_junk, m, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = ref_gae(r.tolist(), v.tolist(), m.tolist(), 0.9, 0.8)
    close(adv, ref_adv)
    close(ret, ref_ret)


# ---------------------------------------------------------------- group-relative estimators

SCORES = [1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 2.0, 1.0, 3.0, 7.0]
GROUPS = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3]  # group 1: zero variance, group 3: single sample


def ref_grpo(scores, groups, norm_by_std=True, eps=1e-6):
    out = []
    for s, gid in zip(scores, groups):
        members = [x for x, h in zip(scores, groups) if h == gid]
        if len(members) == 1:
            out.append(0.0)
            continue
        a = s - statistics.mean(members)
        out.append(a / (statistics.stdev(members) + eps) if norm_by_std else a)
    return out


def _token_mask(B, T=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return torch.arange(T)[None, :] < lengths[:, None]


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_python_reference(norm_by_std):
    m = _token_mask(len(SCORES))
    adv = grpo(torch.tensor(SCORES, dtype=torch.float64), torch.tensor(GROUPS), m, norm_by_std=norm_by_std)
    ref = ref_grpo(SCORES, GROUPS, norm_by_std)
    close(adv, [[a if v else 0.0 for v in row] for a, row in zip(ref, m.tolist())])


def test_grpo_by_hand():
    # group 0: [1, 0, 1, 0], mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    adv = grpo(torch.tensor(SCORES), GROUPS, torch.ones(len(SCORES), 1, dtype=torch.bool))[:, 0]
    a = 0.5 / math.sqrt(1 / 3)
    close(adv[:4], [a, -a, a, -a], atol=1e-4)
    close(adv[4:6], [0.0, 0.0])  # zero variance group
    close(adv[9], 0.0)  # single-sample group: no baseline, no signal


def test_group_ids_may_be_strings():
    m = torch.ones(len(SCORES), 2, dtype=torch.bool)
    uids = [f"prompt-{g}" for g in GROUPS]
    close(grpo(torch.tensor(SCORES), uids, m), grpo(torch.tensor(SCORES), torch.tensor(GROUPS), m))


def test_rloo_by_hand():
    # group [1, 0, 0]: baselines (0+0)/2 = 0, (1+0)/2 = 0.5, (1+0)/2 = 0.5 -> [1, -0.5, -0.5]
    # group [4]: single sample -> 0
    scores = torch.tensor([1.0, 0.0, 0.0, 4.0])
    m = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]).bool()
    close(rloo(scores, [0, 0, 0, 1], m), [[1.0, 1.0], [-0.5, 0.0], [-0.5, -0.5], [0.0, 0.0]])


def test_rloo_matches_python_reference():
    ref = []
    for i, (s, gid) in enumerate(zip(SCORES, GROUPS)):
        others = [x for j, (x, h) in enumerate(zip(SCORES, GROUPS)) if h == gid and j != i]
        ref.append(s - sum(others) / len(others) if others else 0.0)
    m = torch.ones(len(SCORES), 1, dtype=torch.bool)
    close(rloo(torch.tensor(SCORES, dtype=torch.float64), GROUPS, m)[:, 0], ref)


def test_reinforce_plus_plus_by_hand():
    # gamma 0.5, r = [0, 0, 1] -> returns [0.25, 0.5, 1]; second row [2] then padding
    # valid values {0.25, 0.5, 1, 2}: mean 0.9375, whitened with the unbiased std
    r = torch.tensor([[0.0, 0.0, 1.0], [2.0, 5.0, 5.0]])
    m = torch.tensor([[True, True, True], [True, False, False]])
    adv = reinforce_plus_plus(r, m, gamma=0.5)
    close(adv, ref_whiten([[0.25, 0.5, 1.0], [2.0, 0.0, 0.0]], m.tolist()))
    vals = [0.25, 0.5, 1.0, 2.0]
    close(adv[0, 0], (0.25 - statistics.mean(vals)) / statistics.stdev(vals), atol=1e-4)


def test_reinforce_plus_plus_matches_python_loop():
    g, m = random_batch()
    m[0, 2] = False  # a hole mid-sequence: skipped, the return flows across it
    r = torch.randn(m.shape, generator=g, dtype=torch.float64)
    rets = []
    for row, mrow in zip(r.tolist(), m.tolist()):
        out, running = [0.0] * len(row), 0.0
        for t in reversed([t for t in range(len(row)) if mrow[t]]):
            running = row[t] + 0.9 * running
            out[t] = running
        rets.append(out)
    close(reinforce_plus_plus(torch.where(m, r, NAN), m, gamma=0.9), ref_whiten(rets, m.tolist()))


def test_reinforce_plus_plus_baseline_matches_python_reference():
    m = _token_mask(len(SCORES))
    rows = []
    for s, gid, mrow in zip(SCORES, GROUPS, m.tolist()):
        a = s - statistics.mean([x for x, h in zip(SCORES, GROUPS) if h == gid])
        rows.append([a if v else 0.0 for v in mrow])
    adv = reinforce_plus_plus_baseline(torch.tensor(SCORES, dtype=torch.float64), GROUPS, m)
    close(adv, ref_whiten(rows, m.tolist()))
    close(adv[9][m[9]], [ref_whiten(rows, m.tolist())[9][0]] * int(m[9].sum()))


def test_compute_advantages_dispatch():
    assert set(ADV_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"}
    m = _token_mask(len(SCORES))
    # outcome reward on the last valid token; the dispatcher derives scores from token rewards
    last = m.sum(-1) - 1
    tr = torch.zeros(m.shape, dtype=torch.float64)
    tr[torch.arange(len(SCORES)), last] = torch.tensor(SCORES, dtype=torch.float64)
    scores = torch.tensor(SCORES, dtype=torch.float64)
    values = torch.randn(m.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    adv, ret = compute_advantages("gae", token_rewards=tr, values=values, mask=m, gamma=0.9, lam=0.95)
    exp_adv, exp_ret = gae(tr, values, m, 0.9, 0.95)
    close(adv, exp_adv)
    close(ret, exp_ret)
    for name, expected in [
        ("grpo", grpo(scores, GROUPS, m)),
        ("rloo", rloo(scores, GROUPS, m)),
        ("reinforce_plus_plus_baseline", reinforce_plus_plus_baseline(scores, GROUPS, m)),
    ]:
        adv, ret = compute_advantages(name, token_rewards=tr, group_index=GROUPS, mask=m)
        close(adv, expected)
        assert ret is None
    adv, _ = compute_advantages("reinforce_plus_plus", token_rewards=tr, mask=m, gamma=0.9)
    close(adv, reinforce_plus_plus(tr, m, 0.9))

    with pytest.raises(ValueError, match="valid:.*grpo.*rloo"):
        compute_advantages("ppo", mask=m)
    with pytest.raises(ValueError, match="needs `values`"):
        compute_advantages("gae", token_rewards=tr, mask=m)
    with pytest.raises(ValueError, match="needs `group_index`"):
        compute_advantages("grpo", scores=scores, mask=m)


# ---------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 2.0, 99.0], [4.0, 99.0, 99.0], [99.0, 99.0, 99.0]])
LOSS_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]]).bool()  # last row: all padding


@pytest.mark.parametrize("agg,expected", [
    ("token-mean", (1 + 2 + 4) / 3),
    ("seq-mean-token-sum", ((1 + 2) + 4) / 2),
    ("seq-mean-token-mean", ((1 + 2) / 2 + 4 / 1) / 2),
    ("seq-mean-token-sum-norm", ((1 + 2) / 3 + 4 / 3) / 2),  # norm_len defaults to T = 3
])
def test_agg_loss_modes_by_hand(agg, expected):
    close(agg_loss(LOSS, LOSS_MASK, agg), expected)


def test_agg_loss_normalisers():
    close(agg_loss(LOSS, LOSS_MASK, "seq-mean-token-sum-norm", norm_len=10), (3 / 10 + 4 / 10) / 2)
    # global normaliser (e.g. tokens over all micro-batches): sum of valid / 14
    close(agg_loss(LOSS, LOSS_MASK, "token-mean", denominator=14), 7 / 14)
    close(agg_loss(LOSS, LOSS_MASK, "seq-mean-token-sum", denominator=7), 7 / 7)
    with pytest.raises(ValueError, match="valid:.*token-mean"):
        agg_loss(LOSS, LOSS_MASK, "sum")
    assert set(AGG_MODES) == {"token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


# ---------------------------------------------------------------- policy loss

def _pg(ratios, adv, **kw):
    ratios = torch.tensor(ratios, dtype=torch.float64)
    logp = ratios.log().unsqueeze(0).requires_grad_()
    old = torch.zeros_like(logp)
    a = torch.as_tensor(adv, dtype=torch.float64).expand_as(logp)
    loss, metrics = policy_loss(logp, old, a, torch.ones_like(logp, dtype=torch.bool), **kw)
    loss.backward()
    return loss.detach(), metrics, logp.grad[0]


def test_policy_loss_on_policy_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    logp = torch.tensor([[-1.0, -0.3, -2.0]])
    loss, metrics = policy_loss(logp, logp.clone(), adv, torch.ones_like(adv, dtype=torch.bool))
    close(loss, -(1.0 - 2.0 + 0.5) / 3)
    close(metrics["clipfrac"], 0.0)
    close(metrics["approx_kl"], 0.0)
    close(metrics["ratio_mean"], 1.0)


def test_policy_loss_asymmetric_clip_high():
    # A = +1: per-token loss -min(r, clip(r)); only the upper bound can bind.
    ratios = [0.5, 0.9, 1.1, 1.25, 1.5]
    loss_sym, m_sym, g_sym = _pg(ratios, 1.0, clip_low=0.2, clip_high=0.2)
    loss_hi, m_hi, g_hi = _pg(ratios, 1.0, clip_low=0.2, clip_high=0.28)
    close(loss_sym, -(0.5 + 0.9 + 1.1 + 1.2 + 1.2) / 5)
    close(loss_hi, -(0.5 + 0.9 + 1.1 + 1.25 + 1.28) / 5)
    # d(-r)/d(logp) = -r / 5 where unclipped, 0 where clipped
    close(g_sym, [-0.5 / 5, -0.9 / 5, -1.1 / 5, 0.0, 0.0])
    close(g_hi, [-0.5 / 5, -0.9 / 5, -1.1 / 5, -1.25 / 5, 0.0])
    # token by token, raising clip_high changes the loss exactly where ratio > 1 + clip_low
    per_tok = [(_pg([r], 1.0, clip_low=0.2, clip_high=0.2)[0], _pg([r], 1.0, clip_low=0.2, clip_high=0.28)[0])
               for r in ratios]
    assert [bool(a != b) for a, b in per_tok] == [r > 1.2 for r in ratios]
    close(m_sym["clipfrac"], 2 / 5)
    close(m_hi["clipfrac"], 1 / 5)


def test_policy_loss_asymmetric_clip_low():
    # A = -1: per-token loss max(r, clip(r)); only the lower bound can bind.
    loss_a, _, _ = _pg([0.5, 0.75, 0.9], -1.0, clip_low=0.2, clip_high=0.2)
    loss_b, _, _ = _pg([0.5, 0.75, 0.9], -1.0, clip_low=0.3, clip_high=0.2)
    close(loss_a, (0.8 + 0.8 + 0.9) / 3)
    close(loss_b, (0.7 + 0.75 + 0.9) / 3)
    close(_pg([0.5, 0.75, 0.9], -1.0, clip_low=0.2, clip_high=0.5)[0], loss_a)  # clip_high irrelevant here


def test_dual_clip_caps_only_negative_advantages():
    ratios = [5.0, 2.0, 5.0, 0.5]
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    # without dual clip: A=-1,r=5 -> max(5, 1.2) = 5; A=-1,r=2 -> 2; A=+1,r=5 -> -1.2; A=+1,r=0.5 -> -0.5
    loss_plain, m_plain, _ = _pg(ratios, adv)
    close(loss_plain, (5 + 2 - 1.2 - 0.5) / 4)
    close(m_plain["clipfrac_lower"], 0.0)
    # c = 3 caps the first token at -A * c = 3; r=2 stays 2 (< 3); positive advantages untouched
    loss_dual, m_dual, grad = _pg(ratios, adv, dual_clip_c=3.0)
    close(loss_dual, (3 + 2 - 1.2 - 0.5) / 4)
    close(m_dual["clipfrac_lower"], 1 / 4)
    close(grad, [0.0, 2.0 / 4, 0.0, -0.5 / 4])
    # with only positive advantages the dual clip is a no-op even for huge ratios
    close(_pg([10.0, 0.1], 1.0, dual_clip_c=3.0)[0], _pg([10.0, 0.1], 1.0)[0])
    with pytest.raises(ValueError):
        _pg([1.0], 1.0, dual_clip_c=1.0)


def test_policy_loss_metrics_by_hand():
    # log-ratios [0.1, -0.3]: approx_kl = mean(old - new) = (-0.1 + 0.3) / 2 = 0.1
    logp = torch.tensor([[0.1, -0.3]])
    _, metrics = policy_loss(logp, torch.zeros_like(logp), torch.ones_like(logp), torch.ones_like(logp).bool())
    close(metrics["approx_kl"], 0.1)
    close(metrics["ratio_mean"], (math.exp(0.1) + math.exp(-0.3)) / 2)
    close(metrics["clipfrac"], 0.0)
    assert not any(v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_padding_does_not_leak(agg):
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool()
    logp = torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.3
    old = torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(2, 5, generator=g, dtype=torch.float64)
    junk = lambda x: torch.where(m, x, NAN)  # noqa: E731
    lp = junk(logp).requires_grad_()
    loss, metrics = policy_loss(lp, junk(old), junk(adv), m, agg=agg, dual_clip_c=3.0, clip_high=0.28)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert torch.all(lp.grad[~m] == 0)
    # same result as aggregating a hand-built per-token matrix of the valid entries
    r = (logp - old).exp()
    per_tok = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.28))
    per_tok = torch.where(adv < 0, torch.minimum(per_tok, -adv * 3.0), per_tok)
    close(loss, agg_loss(per_tok, m, agg))


# ---------------------------------------------------------------- value loss

def test_value_loss_clipping_by_hand():
    # token 0: V=1.0, old=0.5, R=2 -> unclipped (1-2)^2 = 1, clipped V=0.7 -> 1.69; max 1.69 (clipped)
    # token 1: V=0.6, old=0.5, R=2 -> within the clip: 1.96 both ways
    # token 2: V=2.5, old=2.0, R=2 -> unclipped 0.25, clipped V=2.2 -> 0.04; max 0.25
    # token 3: padding
    v = torch.tensor([[1.0, 0.6, 2.5, NAN]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 2.0, NAN]])
    ret = torch.tensor([[2.0, 2.0, 2.0, NAN]])
    m = torch.tensor([[True, True, True, False]])
    loss, metrics = value_loss(v, old, ret, m, clip=0.2)
    close(loss, 0.5 * (1.69 + 1.96 + 0.25) / 3)
    close(metrics["vf_clipfrac"], 1 / 3)
    loss.backward()
    # token 0 is clipped: no gradient; others: d 0.5*(V-R)^2/3 = (V-R)/3
    close(v.grad, [[0.0, (0.6 - 2.0) / 3, (2.5 - 2.0) / 3, 0.0]])
    loss_nc, metrics_nc = value_loss(v, old, ret, m, clip=None)
    close(loss_nc, 0.5 * (1.0 + 1.96 + 0.25) / 3)
    close(metrics_nc["vf_clipfrac"], 0.0)
    close(value_loss(v, old, ret, m, clip=None, agg="seq-mean-token-sum")[0], 0.5 * (1.0 + 1.96 + 0.25))


def test_value_clipfrac_counts_clipping_not_rounding():
    """Values within the clip: old + (v - old) rounds away from v for some of them in fp32, which
    a bare comparison of the two errors counted as clipping."""
    g = torch.Generator().manual_seed(0)
    old, v = (torch.randn(1, 20000, generator=g) * 0.05 for _ in range(2))  # v - old inexact when they differ in scale
    ret = torch.randn(1, 20000, generator=g)
    within = (v - old).abs() < 0.2
    assert (((old + (v - old) - ret).pow(2) > (v - ret).pow(2)) & within).any()  # the ties are there
    _, metrics = value_loss(v, old, ret, within, clip=0.2)
    assert metrics["vf_clipfrac"] == 0


# ---------------------------------------------------------------- KL

def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    # d = logp - ref = [1, -1]
    close(kl_penalty(logp, ref, "k1"), [1.0, -1.0])
    close(kl_penalty(logp, ref, "k2"), [0.5, 0.5])
    close(kl_penalty(logp, ref, "abs"), [1.0, 1.0])
    # k3 = exp(-d) + d - 1
    close(kl_penalty(logp, ref, "k3"), [math.exp(-1.0) + 1 - 1, math.exp(1.0) - 1 - 1])
    for alias, kind in [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")]:
        close(kl_penalty(logp, ref, alias), kl_penalty(logp, ref, kind))
    # k3 clamps: ref - logp = 30 -> clamped to 20 -> exp(20) - 21, then to 10
    close(kl_penalty(torch.tensor([-31.0]), torch.tensor([-1.0]), "k3"), [10.0])
    with pytest.raises(ValueError, match="valid:"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_on_sampled_tokens():
    g = torch.Generator().manual_seed(0)
    logits_p = torch.randn(8, generator=g, dtype=torch.float64)
    logits_q = logits_p + 0.7 * torch.randn(8, generator=g, dtype=torch.float64)
    logp_all, logq_all = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    true_kl = (logp_all.exp() * (logp_all - logq_all)).sum()
    tokens = torch.multinomial(logp_all.exp(), 200_000, replacement=True, generator=g)
    logp, ref = logp_all[tokens], logq_all[tokens]
    k1, k3 = kl_penalty(logp, ref, "k1"), kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all() and (k3 < 10).all()  # the [-10, 10] clamp would bias this check
    assert (k1 < 0).any()  # k1 is only right on average
    se = k1.std() / math.sqrt(len(tokens))
    assert abs(k1.mean() - true_kl) < 4 * se
    assert abs(k3.mean() - true_kl) < 4 * k3.std() / math.sqrt(len(tokens))
    assert k3.std() < k1.std()  # the point of k3


def test_apply_kl_in_reward_by_hand():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, NAN]])
    ref = torch.tensor([[-1.5, -1.0, -2.0], [-0.5, -2.0, -1.0]])
    m = torch.tensor([[True, True, True], [True, True, False]])
    rewards, mean_kl = apply_kl_in_reward(scores, logp, ref, m, kl_coef=0.1, kind="k1")
    # k1 = logp - ref: [[0.5, 0, 1], [-0.5, 1, pad]]
    close(rewards, [[-0.05, 0.0, 0.9], [0.05, 1.9, 0.0]])
    # per-sequence means 0.5 and 0.25, then their mean
    close(mean_kl, (0.5 + 0.25) / 2)


# ---------------------------------------------------------------- entropy

def test_entropy_uniform_is_log_vocab():
    V = 50
    for c in (0.0, 1e4, -1e4):
        close(entropy_from_logits(torch.full((3, V), c, dtype=torch.float64)), [math.log(V)] * 3)


def test_entropy_stable_and_matches_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=g, dtype=torch.float64) * 3
    p = logits.softmax(-1)
    close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    peaked = torch.tensor([[1000.0, 0.0, 0.0]])
    h = entropy_from_logits(peaked)
    assert torch.isfinite(h).all()
    close(h, [0.0])


# ---------------------------------------------------------------- DAPO filters

def test_filter_zero_variance_groups():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.2, 0.2, 0.3])
    groups = [0, 0, 1, 1, 2, 3, 3, 3]  # 0: mixed, 1: all equal, 2: single, 3: mixed
    keep = filter_zero_variance_groups(scores, groups)
    assert keep.tolist() == [True, True, False, False, False, True, True, True]
    keep = filter_zero_variance_groups(scores, groups, keep_singletons=True)
    assert keep.tolist() == [True, True, False, False, True, True, True, True]
    # consistent with GRPO: kept groups are exactly those with a non-zero advantage somewhere
    adv = grpo(scores, groups, torch.ones(len(groups), 1, dtype=torch.bool))[:, 0]
    for gid in set(groups):
        idx = [i for i, h in enumerate(groups) if h == gid]
        assert keep[idx[0]].item() or len(idx) == 1 or all(adv[i] == 0 for i in idx)


def test_overlong_penalty_endpoints():
    # max 20, buffer 4: 0 up to 16 tokens, then -1/4 per token down to -1 at 20
    lengths = torch.tensor([0, 10, 16, 17, 18, 20])
    close(overlong_penalty(lengths, 20, 4, 1.0), [0.0, 0.0, 0.0, -0.25, -0.5, -1.0])
    close(overlong_penalty(lengths, 20, 4, 2.0)[-1], -2.0)
    close(overlong_penalty(torch.tensor([25]), 20, 4, 1.0), [-1.0])  # never below -penalty_factor
    close(overlong_penalty(lengths, 20, 0, 1.0), [0.0] * 6)
