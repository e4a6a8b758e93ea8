"""Packed micro-batches (`actor.use_dynamic_bsz`): the same numbers as the padded path, less compute.

- token-budget grouping and DP balancing: every row once, budgets kept, ranks within 10% of
  the mean on lengths drawn like real responses (lognormal, a tenth at the maximum);
- packed attention (per-sequence SDPA, FlexAttention) against causal attention written out
  per sequence in float64;
- the models: log-probs, values, and every PPO update's losses and gradients (each
  `loss_agg_mode`, GRPO and GAE advantages, KL loss and entropy on) equal the padded path's
  within 1e-6 (fp32, gloo) at TP=2, PP=2 and DP=2 (2 processes each).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from dist_utils import run_ranks
from mcore_rl.algorithms.losses import AGG_MODES
from mcore_rl.trainer.packing import balance_order, dp_imbalance, token_budget_bins


# ---------------------------------------------------------------- grouping and balancing
def realistic_lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    """Response lengths as `benchmarks/grpo_step.py --lengths realistic` draws them (mean a quarter
    of `max_len`, a tenth at `max_len`, lognormal in between)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "grpo_step.py")
    spec = importlib.util.spec_from_file_location("grpo_step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    draw = bench.length_sampler(max_len, random.Random(seed))
    return [draw() for _ in range(n)]


def test_token_budget_bins_cover_every_row_within_the_budget():
    for seed in range(20):
        lens = realistic_lengths(200, 1000, seed)
        bins = token_budget_bins(lens, 2048)
        assert sorted(i for b in bins for i in b) == list(range(len(lens)))
        assert all(sum(lens[i] for i in b) <= 2048 for b in bins)
        fewest = math.ceil(sum(lens) / 2048)
        assert len(bins) <= fewest + 1, (len(bins), fewest)  # first-fit decreasing packs nearly full
    with pytest.raises(ValueError, match="exceeds the token budget of 10"):
        token_budget_bins([4, 11], 10)


def test_balance_order_keeps_mini_batches_and_evens_tokens():
    dp, mini, n = 8, 32, 8  # 32 prompts a mini-batch, 8 samples each, over 8 DP ranks: 4 prompts a rank
    lens = realistic_lengths(128 * n * 5, 4096)
    assert abs(sum(lens) / len(lens) / 4096 - 0.25) < 0.02 and 0.1 <= lens.count(4096) / len(lens) < 0.13
    for seed in range(5):
        rng = random.Random(seed)
        order = list(range(128))
        rng.shuffle(order)
        sample_lens = lens[seed * 128 * n:(seed + 1) * 128 * n]
        tokens = [sum(sample_lens[p * n:(p + 1) * n]) + n * 128 for p in range(128)]  # responses + prompts
        out = balance_order(order, tokens, mini, dp)
        for i in range(0, 128, mini):
            assert sorted(out[i:i + mini]) == sorted(order[i:i + mini])  # same prompts in each mini-batch
        assert dp_imbalance(out, tokens, mini, dp) <= 1.1
        assert dp_imbalance(order, tokens, mini, dp) > dp_imbalance(out, tokens, mini, dp)
    assert balance_order(order, tokens, mini, 1) == order


def test_budget_below_the_longest_sequence_fails_at_start():
    from mcore_rl.config import ConfigError, check_sizes, load_config

    packed = "actor_rollout_ref.actor.use_dynamic_bsz=true"
    cfg = load_config(None, [packed, "data.max_prompt_length=100", "data.max_response_length=400",
                             "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=499"])
    with pytest.raises(ConfigError, match=r"ref.log_prob_max_token_len_per_gpu=499 is below the longest sequence.* 500"):
        check_sizes(cfg, 1)
    check_sizes(load_config(None, [packed, "data.max_prompt_length=100", "data.max_response_length=400",
                                   "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=500"]), 1)
    check_sizes(load_config(None, ["actor_rollout_ref.actor.use_dynamic_bsz=false",  # padded: no budget
                                   "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=1"]), 1)


# ---------------------------------------------------------------- attention
def _reference_attention(q, k, v, bounds):
    """Causal softmax attention within each sequence, float64, written out."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    rep = q.size(1) // k.size(1)
    for s, e in zip(bounds[:-1], bounds[1:]):
        qi = q[s:e].double().transpose(0, 1)
        ki = k[s:e].double().repeat_interleave(rep, 1).transpose(0, 1)
        vi = v[s:e].double().repeat_interleave(rep, 1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) / math.sqrt(q.size(-1))
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        out[s:e] = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vi).transpose(0, 1)
    return out.reshape(q.size(0), -1)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_packed_attention_is_causal_within_each_sequence(kernel):
    from megatron.core.packed_seq_params import PackedSeqParams

    from mcore_rl.models.attention import packed_attention

    if kernel == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 17, 9, 3]
    bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
    t = bounds[-1]
    backward = kernel == "sdpa"  # FlexAttention has no backward on CPU
    q, k, v = (torch.randn(t, h, 32, generator=g, requires_grad=backward) for h in (4, 2, 2))  # GQA 4 / 2
    cu = torch.tensor(bounds, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                             max_seqlen_kv=max(lens))
    got = packed_attention(q, k, v, params, kernel=kernel)
    want = _reference_attention(q, k, v, bounds)
    assert (got.double() - want).abs().max() < 1e-5
    if not backward:
        return
    # gradients: attention to another sequence would give its keys a gradient from this one's queries
    got[bounds[2]:bounds[3]].sum().backward()
    outside = torch.ones(t, dtype=torch.bool)
    outside[bounds[2]:bounds[3]] = False
    assert k.grad[outside].abs().max() == 0 and v.grad[outside].abs().max() == 0
    assert k.grad[~outside].abs().max() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["varlen", "flex", "sdpa"])
def test_packed_attention_kernels_on_gpu(kernel):
    """The CUDA kernels (bf16, GQA 12 / 2 heads, head size 128, realistic lengths) against the
    float64 reference, forward and backward, with no attention across sequences."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from mcore_rl.models import attention

    if kernel == "varlen" and attention._varlen_fn() is None:
        pytest.skip("this torch has no varlen attention")
    lens = [700, 37, 1500, 1, 260, 1024]
    bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
    t = bounds[-1]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, h, 128, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (12, 2, 2))
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                             max_seqlen_kv=max(lens))
    got = attention.packed_attention(q, k, v, params, kernel=kernel)
    assert not attention._BROKEN
    want = _reference_attention(q.cpu(), k.cpu(), v.cpu(), bounds)
    assert (got.cpu().double() - want).abs().max() < 2e-2  # bf16
    got[bounds[2]:bounds[3]].float().sum().backward()
    outside = torch.ones(t, dtype=torch.bool, device="cuda")
    outside[bounds[2]:bounds[3]] = False
    assert k.grad[outside].abs().max() == 0 and k.grad[~outside].abs().max() > 0


def test_packed_rope_equals_megatrons_per_sequence_rope():
    """One rotary kernel over the packed row (freqs gathered at each token's position in its
    sequence) gives megatron-core's per-sequence THD RoPE, bit for bit."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import TransformerConfig

    import megatron.core.transformer.attention as mattn
    from mcore_rl.models.attention import install_packed_rope, packed_positions

    install_packed_rope()
    lens = [5, 1, 17, 9]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    assert packed_positions(cu, 32).tolist() == [p for n in lens for p in range(n)]
    g = torch.Generator().manual_seed(0)
    t = torch.randn(32, 4, 16, generator=g)
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    freqs = torch.outer(torch.arange(max(lens)).float(), inv)
    freqs = torch.cat([freqs, freqs], -1)[:, None, None, :]  # [max_len, 1, 1, d], as megatron's table
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    want = rope_utils._apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=OneRank())
    got = mattn.apply_rotary_pos_emb(t, freqs, config=config, cu_seqlens=cu, cp_group=OneRank())
    assert torch.equal(got, want)
    assert not torch.equal(got, rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[:1].expand(32, -1, -1, -1))[:, 0])


# ---------------------------------------------------------------- the models, packed vs padded
P_MAX, R_MAX, ROWS = 6, 10, 16  # per DP rank: 16 rows, two mini-batches of 8
BUDGET = 40                     # a few packed micro-batches of different lengths per mini-batch


def _shard(dp: int, rank: int, seed: int = 0):
    """A synthetic training shard (this DP rank's rows): random lengths, tokens, scores, rollout log-probs."""
    from mcore_rl.trainer.batch import Sample, pad_batch

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(ROWS * dp):
        p = int(torch.randint(1, P_MAX + 1, (1,), generator=g))
        r = int(torch.randint(0, R_MAX + 1, (1,), generator=g)) if i % 5 else R_MAX
        samples.append(Sample(i // 2, i % 2, torch.randint(0, 250, (p,), generator=g).tolist(),
                              torch.randint(0, 250, (r,), generator=g).tolist(), [-1.0] * r, "stop",
                              float(torch.rand((), generator=g))))
    return pad_batch(samples[rank * ROWS:(rank + 1) * ROWS], P_MAX, R_MAX, pad_id=0)


def _perturbed(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def _models_worker(path, tp, pp):
    from megatron.core import parallel_state as ps

    import mcore_rl.trainer.ppo_update as ppo_update
    from converters.hf_io import load_hf_into_model
    from mcore_rl.algorithms import compute_advantages
    from mcore_rl.config import load_config
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model
    from mcore_rl.models.optim import wrap_for_training
    from converters.gather import iter_hf_tensors
    from mcore_rl.trainer.batch import last_token_rewards

    init_distributed(tp, pp)
    spec = arch_from_hf_config(path)
    dp, dp_group = ps.get_data_parallel_world_size(), ps.get_data_parallel_group()

    def model(role, perturb=None):
        m = build_model(spec, role=role)
        load_hf_into_model(m, spec, path)
        if perturb is not None:
            _perturbed(m, 0.02, perturb)
        return m if role == "reference" else wrap_for_training(m, lr=1e-3)

    (actor, actor_opt), (critic, critic_opt) = model("actor"), model("critic", perturb=1)
    ref = model("reference", perturb=2)
    shard = _shard(dp, ps.get_data_parallel_rank())
    mask = shard.mask
    out = {"logp": {}, "values": {}, "updates": {}}
    # the forward passes, padded (4 rows a micro-batch) and packed (BUDGET tokens)
    for name, budget in (("padded", None), ("packed", BUDGET)):
        logp, ent = ppo_update.compute_logprobs(actor, shard, 4, with_entropy=True, max_tokens=budget)
        values = ppo_update.compute_values(critic, shard, 4, max_tokens=budget)
        out["logp"][name], out["entropy_fwd"] = logp, ent
        out["values"][name] = values
    lengths = (shard.prompt_length + shard.response_length - 1)[:, None]
    out["valid"] = torch.arange(mask.shape[1])[None] < lengths  # positions inside each sequence
    shard.old_logp = out["logp"]["padded"] + 0.01 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    shard.ref_logp = ppo_update.compute_logprobs(ref, shard, 4)[0]
    shard.old_values = out["values"]["padded"]
    rewards = last_token_rewards(shard.scores, mask)

    grads = []

    def record(model, opt, loss_finite=True):
        grads.append({k: v.detach().clone() for k, v in iter_hf_tensors(model, source="grad")})
        model.zero_grad_buffer()
        opt.zero_grad()
        return True, 0.0

    ppo_update._step = record  # the gradient of each mini-batch, no update: every run sees the same weights
    minis = [range(0, ROWS // 2), range(ROWS // 2, ROWS)]
    for est in ("grpo", "gae"):
        shard.advantages, shard.returns = compute_advantages(est, mask=mask, token_rewards=rewards,
                                                             values=shard.old_values, group_index=shard.prompt_index,
                                                             group=dp_group)
        for agg in AGG_MODES:
            for name, dyn in (("padded", "false"), ("packed", "true")):
                cfg = load_config(None, [
                    f"data.max_prompt_length={P_MAX}", f"data.max_response_length={R_MAX}",
                    f"actor_rollout_ref.actor.use_dynamic_bsz={dyn}", f"actor_rollout_ref.actor.loss_agg_mode={agg}",
                    f"critic.loss_agg_mode={agg}", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                    "critic.ppo_micro_batch_size_per_gpu=4", f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={BUDGET}",
                    f"critic.ppo_max_token_len_per_gpu={BUDGET}", "actor_rollout_ref.actor.use_kl_loss=true",
                    "actor_rollout_ref.actor.kl_loss_coef=0.5", "actor_rollout_ref.actor.entropy_coeff=0.01"])
                grads.clear()
                m = ppo_update.update_actor(actor, actor_opt, shard, cfg, minis, dp_group)
                if est == "gae":
                    m.update(ppo_update.update_critic(critic, critic_opt, shard, cfg, minis, dp_group))
                out["updates"][(est, agg, name)] = (m, list(grads))
    return out


def _rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors of a gradient."""
    assert sorted(a) == sorted(b)
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in b) / sum(float(b[k].pow(2).sum()) for k in b))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from conftest import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("packing") / "llama", "llama")


def _layouts_worker(path, layouts):
    """`_models_worker` at each (tp, pp) in turn, in this pair of processes (one start-up for all)."""
    return {(tp, pp): _models_worker(path, tp, pp) for tp, pp in layouts}


@pytest.fixture(scope="module")
def packed_vs_padded(request, tiny_llama):
    """{(tp, pp): per-rank results} of the selected layouts, all run by one pair of processes."""
    layouts = sorted({(item.callspec.params["tp"], item.callspec.params["pp"]) for item in request.session.items
                      if item.module is request.module and item.originalname == "test_packed_equals_padded"})
    ranks = run_ranks(_layouts_worker, 2, tiny_llama, layouts)
    return {layout: [r[layout] for r in ranks] for layout in layouts}


@pytest.mark.train
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_packed_equals_padded(packed_vs_padded, tp, pp):
    """Log-probs, values, and every update's losses and per-mini-batch gradients (actor for GRPO
    and GAE advantages; critic for GAE), packed into token-budget micro-batches vs padded ones."""
    results = packed_vs_padded[tp, pp]
    for r in results:
        valid = r["valid"]
        for key in ("logp", "values"):
            a, b = r[key]["packed"][valid], r[key]["padded"][valid]
            assert b.abs().max() > 0.01 and float((a - b).norm() / b.norm()) < 1e-6, key
        for (est, agg, name), (metrics, grads) in r["updates"].items():
            if name != "packed":
                continue
            want, want_grads = r["updates"][(est, agg, "padded")]
            keys = ["actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/entropy"] + ["critic/loss"] * (est == "gae")
            for k in keys:
                # relative to the loss or to its terms' scale (advantages and log-ratios are O(1)):
                # a policy loss of 1e-4 is a sum of O(1) terms that cancel
                assert abs(metrics[k] - want[k]) <= 1e-6 * max(abs(want[k]), 1.0), (est, agg, k, metrics[k], want[k])
            assert len(grads) == len(want_grads) == (4 if est == "gae" else 2)  # per mini-batch (and model)
            for got_g, want_g in zip(grads, want_grads):
                assert _rel(got_g, want_g) < 1e-6, (est, agg, _rel(got_g, want_g))
