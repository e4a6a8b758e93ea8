"""The trainer's wiring, checked directly: things a wrong connection would break while the end-to-end
runs still train and look plausible.

- the loss does not depend on the micro-batch size (one mini-batch-wide denominator);
- the KL loss term contributes its gradient (autograd of pg + coef * KL, written out here and
  computed on a plain transformers copy of the actor, equals the trainer's gradient);
- GRPO group ids are the prompts the samples were generated from (responses as the engine gave
  them, advantages normalised within those groups);
- a resume restores the RNG states (numbers drawn after a resume equal those of the run that saved);
- the response mask is shifted exactly by one; prompt positions are not in the loss; the rollout
  engine holds the actor's current weights at every step.

The trainers run on the toy model with the transformers rollout engine, fp32, all in one spawned
world-of-one process (`dist_utils.run_ranks`): starting a process and its first trainer costs more
than a step, so the module pays it once. Each test's worker has its own output dir, and the trainer
functions a worker patches are put back after it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from dist_utils import run_ranks
from mcore_rl.trainer.batch import Sample, pad_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO, "configs", "toy_grpo.yaml")
# GRPO on the toy task, small: 8 prompts x 2 samples, one mini-batch of 16 rows in micro-batches of 4.
BASE = ["data.train_batch_size=8", "data.max_prompt_length=8", "data.max_response_length=8",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "critic.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4", "actor_rollout_ref.rollout.name=hf",
        "trainer.logger=[console]", "trainer.export_hf_at_end=false", "trainer.resume=off"]

# Scores spread over 11 values (the toy reward is mostly 0 for the initial policy): GRPO groups
# then have different scores and non-zero advantages.
VARIED_REWARD = '''
def reward(prompt, response, ground_truth):
    return (sum((i + 1) * ord(c) for i, c in enumerate(response)) % 11) / 10.0
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(toy model path, reward spec) shared by every test of the module."""
    from mcore_rl.toy import build_toy_model

    root = tmp_path_factory.mktemp("wiring")
    model = build_toy_model(root / "model", seed=1)
    (root / "varied_reward.py").write_text(VARIED_REWARD)
    return str(model), f"{root / 'varied_reward.py'}:reward"


# which worker each test reads (all of them run in one process, below)
WORKER_OF = {"test_loss_does_not_depend_on_micro_batch_size": "micro", "test_kl_loss_contributes_its_gradient": "kl",
             "test_grpo_group_ids_are_the_prompts": "grpo",
             "test_response_mask_marks_the_tokens_after_each_position": "grpo",
             "test_resume_restores_rng": "rng", "test_prompt_positions_are_not_in_the_loss": "prompt",
             "test_engine_holds_the_actor_weights_every_step": "sync"}


def _workers(names, model, reward, out):
    """Run the named workers one after another in this process; a worker that raises is reported by
    its own test (its traceback as text), the others still run. Every trainer a worker built is
    closed after it, raised or not: an open one's reward helper would keep this process from exiting."""
    import traceback

    import mcore_rl.trainer.ppo_trainer as pt
    import mcore_rl.trainer.ppo_update as ppo_update

    fns = {"micro": _micro_worker, "kl": _kl_worker, "grpo": _grpo_worker, "rng": _resume_worker,
           "prompt": _prompt_worker, "sync": _sync_worker}
    init = pt.PPOTrainer.__init__
    results = {}
    for name in names:
        saved = pt.update_actor, pt.compute_advantages, ppo_update._step
        built = []

        def tracked_init(self, *args, **kwargs):
            built.append(self)
            init(self, *args, **kwargs)

        pt.PPOTrainer.__init__ = tracked_init
        try:
            results[name] = fns[name](model, reward, os.path.join(out, name))
        except Exception:
            results[name] = _Failed(traceback.format_exc())
        finally:
            pt.PPOTrainer.__init__ = init
            pt.update_actor, pt.compute_advantages, ppo_update._step = saved
            for tr in built:
                tr.close()
    return results


class _Failed(str):
    """A worker's traceback."""


@pytest.fixture(scope="module")
def worker(request, setup, tmp_path_factory):
    """`worker(name)`: what that worker returned. The workers of the selected tests run together."""
    names = sorted({WORKER_OF[item.originalname] for item in request.session.items
                    if item.module is request.module and item.originalname in WORKER_OF})
    results = run_ranks(_workers, 1, names, *setup, str(tmp_path_factory.mktemp("runs")))[0]

    def get(name):
        r = results[name]
        if isinstance(r, _Failed):
            pytest.fail(f"worker {name} raised:\n{r}", pytrace=False)
        return r

    return get


# ---------------------------------------------------------------- helpers run in the rank process
def _trainer(out, model, reward, *extra):
    from mcore_rl.config import load_config
    from mcore_rl.trainer.ppo_trainer import PPOTrainer

    cfg = load_config(PRESET, BASE + [f"actor_rollout_ref.model.path={model}", f"reward.name={reward}",
                                      f"trainer.output_dir={out}", *extra])
    return PPOTrainer(cfg)


def _hf_named(model, source="param") -> dict[str, torch.Tensor]:
    """The model's tensors (or gradients) under their HF names, as the weight sync produces them."""
    from converters.gather import iter_hf_tensors

    return {name: t.detach().float().clone() for name, t in iter_hf_tensors(model, source=source)}


def _perturb(model, scale: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _recording_step(grads: list):
    """A stand-in for `ppo_update._step`: records the accumulated gradients (HF names), applies nothing."""

    def step(model, opt, loss_finite=True):
        grads.append(_hf_named(model, "grad"))
        model.zero_grad_buffer()
        opt.zero_grad()
        return True, 0.0

    return step


# ---------------------------------------------------------------- 1. micro-batch size
def _micro_worker(model, reward, out):
    metrics = {}
    # padded micro-batches of 4 and 16 rows; packed ones of at most 24 real tokens (several a mini-batch)
    for micro, dyn in ((4, "false"), (16, "false"), ("packed", "true")):
        # 16 prompts x 2 samples, mini-batches of 8 prompts (16 rows): two updates, the second at ratio != 1
        tr = _trainer(f"{out}/micro{micro}", model, reward, "data.train_batch_size=16",
                      f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={4 if micro == 'packed' else micro}",
                      f"actor_rollout_ref.actor.use_dynamic_bsz={dyn}", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24",
                      "actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.kl_loss_coef=0.5",
                      "actor_rollout_ref.actor.entropy_coeff=0.01")
        tr.step = 1
        metrics[micro] = tr.train_step()
        tr.close()
    return metrics


@pytest.mark.train
def test_loss_does_not_depend_on_micro_batch_size(worker):
    """The same step at micro-batch 4 (4 micro-batches per mini-batch), 16 (one) and packed into
    micro-batches of at most 24 real tokens: same loss, policy loss, KL loss, entropy and gradient
    norm. A denominator per micro-batch (instead of the mini-batch's token count) scales the
    4-micro-batch loss and gradient."""
    m = worker("micro")
    b = m[16]
    assert abs(b["actor/pg_loss"]) > 1e-4 and b["actor/grad_norm"] > 1e-3  # something to compare
    for a in (m[4], m["packed"]):
        for k in ("reward/mean", "response/length_mean"):  # the same rollout
            assert a[k] == b[k], (k, a[k], b[k])
        for k in ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm"):
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-8), (k, a[k], b[k])


# ---------------------------------------------------------------- 2. KL loss gradient
KL_COEF = 0.9


def _kl_worker(model, reward, out):
    import mcore_rl.trainer.ppo_trainer as pt
    import mcore_rl.trainer.ppo_update as ppo_update

    tr = _trainer(out, model, reward, "actor_rollout_ref.actor.use_kl_loss=true",
                  f"actor_rollout_ref.actor.kl_loss_coef={KL_COEF}", "actor_rollout_ref.actor.kl_loss_type=low_var_kl")
    _perturb(tr.ref, 0.03)  # the actor differs from its reference: a KL with a real gradient
    cap = {}
    original_update, original_step = pt.update_actor, ppo_update._step

    def update_actor(actor, opt, shard, cfg, minis, group):
        cap["shard"], cap["rows"] = shard, minis[0]
        return original_update(actor, opt, shard, cfg, minis, group)

    def step(model, opt, loss_finite=True):  # the first mini-batch's gradient, at the weights it was taken at
        if "grads" not in cap:
            cap["grads"], cap["weights"] = _hf_named(model, "grad"), _hf_named(model)
        return original_step(model, opt, loss_finite)

    pt.update_actor, ppo_update._step = update_actor, step
    tr.step = 1
    metrics = tr.train_step()
    tr.close()

    # The same loss, independently: a transformers copy of the actor, the formulas written out.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf.load_state_dict(cap["weights"], strict=True)
    # HF's embedding has padding_idx = the pad id, whose row then gets no gradient; the toy policy can
    # sample that token inside a response, where it is an ordinary input (the trainer trains its row)
    hf.get_input_embeddings().padding_idx = None
    s, rows = cap["shard"], cap["rows"]
    sl = slice(rows.start, rows.stop)
    ids, mask = s.input_ids[sl], s.mask[sl].float()
    old, ref, adv = s.old_logp[sl], s.ref_logp[sl], s.advantages[sl]
    tokens = mask.sum()

    def losses():
        logits = hf(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - old)
        pg_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 0.2, 1 + 0.2))
        pg = (pg_tok * mask).sum() / tokens
        d = ref - logp  # k3 (low_var_kl): exp(ref - logp) - (ref - logp) - 1
        kl = ((torch.exp(d) - d - 1) * mask).sum() / tokens
        return pg, kl

    def grads_of(loss):
        hf.zero_grad()
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in hf.named_parameters()}

    pg, kl = losses()
    full = grads_of(pg + KL_COEF * kl)
    pg_only = grads_of(losses()[0])
    return dict(metrics=metrics, grads=cap["grads"], full=full, pg_only=pg_only, pg=float(pg), kl=float(kl),
                single_minibatch=len(s) == rows.stop - rows.start)


def _rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors."""
    assert sorted(a) == sorted(b)
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return math.sqrt(num / den)


@pytest.mark.train
def test_kl_loss_contributes_its_gradient(worker):
    """use_kl_loss with coefficient 0.9 and a reference that differs from the actor: the gradient of
    the trainer's loss equals autograd of pg + 0.9 * KL(k3) computed here in plain PyTorch on a
    transformers copy of the actor. A dropped KL term, or one computed on a detached tensor (same
    loss value, no gradient), leaves the policy-loss gradient only."""
    r = worker("kl")
    assert r["single_minibatch"]
    m = r["metrics"]
    assert r["kl"] > 1e-3  # the actor really differs from the reference
    assert math.isclose(m["actor/kl_loss"], r["kl"], rel_tol=1e-4), (m["actor/kl_loss"], r["kl"])
    assert math.isclose(m["actor/pg_loss"], r["pg"], rel_tol=1e-4, abs_tol=1e-6), (m["actor/pg_loss"], r["pg"])
    assert math.isclose(m["actor/loss"], r["pg"] + KL_COEF * r["kl"], rel_tol=1e-4)
    kl_share = _rel(r["pg_only"], r["full"])
    assert kl_share > 0.05, f"the KL term moves the gradient by only {kl_share:.3g}: the test would not see it"
    err = _rel(r["grads"], r["full"])
    assert err < 1e-4, (f"trainer gradient vs autograd of pg + {KL_COEF} * KL: relative error {err:.3g} "
                        f"(vs the policy-loss gradient alone: {_rel(r['grads'], r['pg_only']):.3g})")


# ---------------------------------------------------------------- 3. GRPO groups (+ 5a on the real shard)
N_SAMPLES = 3


def _grpo_worker(model, reward, out):
    import mcore_rl.trainer.ppo_trainer as pt

    tr = _trainer(out, model, reward, f"actor_rollout_ref.rollout.n={N_SAMPLES}",
                  "actor_rollout_ref.actor.ppo_mini_batch_size=4")
    cap = {"generate": []}
    original_generate, original_rollout, original_shard = tr.engine.generate, tr._rollout, tr._shard
    original_adv = pt.compute_advantages

    def generate(prompts, sampling):
        outs = original_generate(prompts, sampling)
        cap["generate"].append(([list(p) for p in prompts],
                                [(o.prompt_index, o.sample_index, list(o.token_ids), list(o.logprobs)) for o in outs]))
        return outs

    def rollout(rows, timing):
        local = original_rollout(rows, timing)
        cap["rows"] = [list(r.input_ids) for r in rows]
        cap["local"] = dataclasses.replace(local)
        return local

    def shard(local, order):
        s = original_shard(local, order)
        cap["shard"] = s  # filled in later by the step (log-probs, advantages)
        return s

    def compute_advantages(*args, **kwargs):
        cap["group_index"] = kwargs["group_index"].clone()
        return original_adv(*args, **kwargs)

    tr.engine.generate, tr._rollout, tr._shard = generate, rollout, shard
    pt.compute_advantages = compute_advantages
    tr.step = 1
    tr.train_step()
    tr.close()
    return cap


@pytest.fixture
def grpo_step(worker):
    """One GRPO step (8 prompts x 3 samples) with the engine's outputs and the step's shards recorded."""
    return worker("grpo")


def _check_samples_match_engine(shard, rows, outs):
    """Every row: its prompt is that of its group id, its response and rollout log-probs are the
    engine's output for (that prompt, its sample index); each (prompt, sample) exactly once."""
    seen = []
    for i in range(len(shard)):
        P, k = int(shard.prompt_index[i]), int(shard.sample_index[i])
        p, r = int(shard.prompt_length[i]), int(shard.response_length[i])
        assert shard.input_ids[i, :p].tolist() == rows[P], (i, P)
        tokens, logprobs = outs[(P, k)]
        assert shard.input_ids[i, p:p + r].tolist() == tokens, f"row {i} (group {P}, sample {k}): not its response"
        assert torch.allclose(shard.rollout_logprobs[i, p - 1:p - 1 + r], torch.tensor(logprobs), atol=1e-6)
        seen.append((P, k))
    assert sorted(seen) == sorted(outs)


@pytest.mark.train
def test_grpo_group_ids_are_the_prompts(grpo_step):
    cap = grpo_step
    rows = cap["rows"]
    assert len(cap["generate"]) == 1  # DP=1: one engine generates the whole batch, in batch order
    prompts, outs = cap["generate"][0]
    assert prompts == rows
    outs = {(P, k): (tokens, lps) for P, k, tokens, lps in outs}
    assert len(outs) == len(rows) * N_SAMPLES
    local, shard = cap["local"], cap["shard"]
    _check_samples_match_engine(local, rows, outs)  # after _rollout
    _check_samples_match_engine(shard, rows, outs)  # the training shard, after _shard
    ids = shard.prompt_index.tolist()
    assert ids == sorted(ids) and all(ids.count(P) == N_SAMPLES for P in set(ids))  # groups contiguous
    # the advantages are grouped by those ids: GRPO's (score - group mean) / (group std + eps)
    assert torch.equal(cap["group_index"], shard.prompt_index)
    scores = shard.scores
    want = torch.zeros(len(shard))
    for P in set(ids):
        g = shard.prompt_index == P
        want[g] = (scores[g] - scores[g].mean()) / (scores[g].std() + 1e-6)
    assert sum(float(scores[shard.prompt_index == P].std()) > 0 for P in set(ids)) >= 3  # groups that differ
    mask = shard.mask
    assert torch.allclose(shard.advantages, torch.where(mask, want.unsqueeze(1), 0.0), atol=1e-5)


# ---------------------------------------------------------------- 5a. response mask
@pytest.mark.train
def test_response_mask_marks_the_tokens_after_each_position(grpo_step):
    """mask[i, t] is 1 exactly where token t + 1 is a response token; on a shard built from known
    prompt / response lengths, and on the step's real shard (where the actor's log-prob at a mask
    position is that of the sampled response token the engine reported)."""
    P_LEN, R_LEN = 5, 6
    lengths = [(1, 6), (3, 4), (5, 1), (2, 0), (5, 6), (4, 3)]
    samples = [Sample(i, 0, list(range(10, 10 + p)), list(range(50, 50 + r)), [-0.5] * r, "stop")
               for i, (p, r) in enumerate(lengths)]
    shard = pad_batch(samples, P_LEN, R_LEN, pad_id=0)
    assert shard.mask.shape == (len(lengths), P_LEN + R_LEN - 1)
    for i, (p, r) in enumerate(lengths):
        for t in range(P_LEN + R_LEN - 1):
            assert bool(shard.mask[i, t]) == (p <= t + 1 < p + r), (i, p, r, t)
        # the tokens the mask selects (shifted by one) are the response, in order
        assert shard.input_ids[i, 1:][shard.mask[i]].tolist() == samples[i].response_ids

    s = grpo_step["shard"]
    m = s.mask
    assert int(m.sum()) == int(s.response_length.sum()) > 0
    for i in range(len(s)):
        p, r = int(s.prompt_length[i]), int(s.response_length[i])
        assert s.input_ids[i, 1:][m[i]].tolist() == s.input_ids[i, p:p + r].tolist()
    # old_logp[t] scores token t + 1 under the actor; at the mask it equals the engine's log-prob
    # of that response token (same weights, fp32)
    assert (s.old_logp - s.rollout_logprobs)[m].abs().max() < 1e-4


# ---------------------------------------------------------------- 4. RNG restored on resume
def _draw() -> dict:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    out = {"torch": torch.rand(8), "python": [random.random() for _ in range(4)], "numpy": np.random.rand(4)}
    with get_cuda_rng_tracker().fork():
        out["megatron_tracker"] = torch.rand(4)
    return out


def _resume_worker(model, reward, out):
    args = ("trainer.max_steps=1", "trainer.resume=auto")
    a = _trainer(out, model, reward, *args)
    a.fit()  # one step, then the checkpoint at step 1
    uninterrupted = _draw()  # what the run that saved draws next
    a.close()
    b = _trainer(out, model, reward, *args)  # a fresh trainer, same layout: resumes from step 1
    resumed_step = b.step
    resumed = _draw()
    b.close()
    return uninterrupted, resumed, resumed_step


@pytest.mark.resume
def test_resume_restores_rng(worker):
    """Save at step 1, load into a fresh trainer: the torch, Python, numpy and megatron-tracker
    random streams continue where the saving run's do (a load that skips the RNG restore leaves
    the fresh trainer's seeding)."""
    uninterrupted, resumed, step = worker("rng")
    assert step == 1
    assert sorted(resumed) == sorted(uninterrupted)
    for k in uninterrupted:
        assert torch.equal(torch.as_tensor(resumed[k]), torch.as_tensor(uninterrupted[k])), k


# ---------------------------------------------------------------- 5b. prompt positions not in the loss
def _prompt_worker(model, reward, out):
    import mcore_rl.trainer.ppo_trainer as pt
    import mcore_rl.trainer.ppo_update as ppo_update

    tr = _trainer(out, model, reward, "actor_rollout_ref.actor.use_kl_loss=true",
                  "actor_rollout_ref.actor.kl_loss_coef=0.5", "actor_rollout_ref.actor.entropy_coeff=0.01")
    _perturb(tr.ref, 0.03)
    original_update, original_step = pt.update_actor, ppo_update._step
    results = {}

    def update_actor(actor, opt, shard, cfg, minis, group):
        # from the lengths, not from shard.mask: position t scores token t + 1
        pos = torch.arange(shard.input_ids.shape[1] - 1)
        first = (shard.prompt_length - 1).unsqueeze(1)  # the position that scores the first response token
        prompt = pos < first
        pad = pos >= first + shard.response_length.unsqueeze(1)
        assert prompt.any() and pad.any()
        g = torch.Generator().manual_seed(1)

        def junk(x, where):
            return torch.where(where, 100.0 * torch.randn(x.shape, generator=g), x)

        one = torch.zeros_like(prompt)
        one[0, int(shard.prompt_length[0]) - 1] = True  # one response position
        variants = {
            "base": shard,
            "prompt_adv": dataclasses.replace(shard, advantages=junk(shard.advantages, prompt)),
            "pad_adv": dataclasses.replace(shard, advantages=junk(shard.advantages, pad)),
            "prompt_logp": dataclasses.replace(shard, old_logp=junk(shard.old_logp, prompt),
                                               ref_logp=junk(shard.ref_logp, prompt)),
            "response_adv": dataclasses.replace(shard, advantages=shard.advantages + 5.0 * one),
        }
        for name, s in variants.items():
            grads = []
            ppo_update._step = _recording_step(grads)  # no update: every variant at the same weights
            results[name] = (original_update(actor, opt, s, cfg, minis, group), grads)
        ppo_update._step = original_step
        return original_update(actor, opt, shard, cfg, minis, group)

    pt.update_actor = update_actor
    tr.step = 1
    tr.train_step()
    tr.close()
    return results


@pytest.mark.train
def test_prompt_positions_are_not_in_the_loss(worker):
    """Advantages (or old / reference log-probs) changed on the positions that score prompt tokens,
    or on padding, change neither the loss nor the gradient; one response position does."""
    res = worker("prompt")
    base_m, base_g = res["base"]
    keys = ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/entropy")

    def same(name):
        m, g = res[name]
        return (all(math.isclose(m[k], base_m[k], rel_tol=1e-6, abs_tol=1e-9) for k in keys)
                and _rel(g[0], base_g[0]) < 1e-6)

    for name in ("prompt_adv", "pad_adv", "prompt_logp"):
        m, g = res[name]
        for k in keys:
            assert math.isclose(m[k], base_m[k], rel_tol=1e-6, abs_tol=1e-9), (name, k, m[k], base_m[k])
        assert _rel(g[0], base_g[0]) < 1e-6, (name, _rel(g[0], base_g[0]))
    assert not same("response_adv")  # while one response position does change them


# ---------------------------------------------------------------- 5c. weights synced every step
def _sync_worker(model, reward, out):
    tr = _trainer(out, model, reward, "actor_rollout_ref.actor.ppo_mini_batch_size=4")  # 2 updates a step
    seen = []
    original_generate = tr.engine.generate

    def generate(prompts, sampling):  # after the step's sync, before sampling
        engine = {k: v.detach().float().clone() for k, v in tr.engine.model.state_dict().items()}
        seen.append((tr.step, _hf_named(tr.actor), engine))
        return original_generate(prompts, sampling)

    tr.engine.generate = generate
    for k in (1, 2):
        tr.step = k
        tr.train_step()
    tr.close()
    return seen


@pytest.mark.train
def test_engine_holds_the_actor_weights_every_step(worker):
    """At steps 1 and 2 the rollout engine generates with exactly the actor's current weights
    (the actor changed in between: a sync skipped at step 2 would leave step 1's)."""
    seen = worker("sync")
    assert [s for s, _, _ in seen] == [1, 2]
    for step, actor, engine in seen:
        assert sorted(actor) == sorted(engine), step
        for name in actor:
            assert torch.equal(actor[name], engine[name]), (step, name, float((actor[name] - engine[name]).abs().max()))
    (_, first, _), (_, second, _) = seen
    assert any(not torch.equal(first[n], second[n]) for n in first)  # the actor trained in between
