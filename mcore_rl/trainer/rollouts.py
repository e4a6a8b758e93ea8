"""The step's rollouts: each engine generates its slice of the prompts; its first rank scores them.

Every rank of a rollout engine (rollout TP > 1) runs `generate` (vLLM's ranks generate together)
and holds the samples, but only the engine's first rank calls the reward function: a reward may
be slow (a sandbox, a judge model) or have side effects, so it runs once per sample. The scores
reach the engine's other ranks in one all-reduce of a float per sample of the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mcore_rl.distributed import comm
from mcore_rl.rewards import RewardFunctionError
from mcore_rl.rollout.base import Sampling
from mcore_rl.trainer.batch import Sample, Shard, pad_batch


@dataclass
class SliceSampling(Sampling):
    """Sampling for a slice of the step's batch: prompt k of the call is prompt `prompts[k]` of
    the batch and gets that prompt's seed, so samples do not depend on who generates them."""

    prompts: tuple[int, ...] = ()

    def request_seed(self, prompt_index: int) -> int | None:
        return None if self.seed is None else self.seed + self.prompts[prompt_index] * self.n


def step_sampling(cfg, step: int, slice_: list[int]) -> SliceSampling:
    """Step `step`'s sampling for the prompts `slice_` of its batch. Colocated and split ranks both
    build it here, so split at staleness 0 samples exactly what colocated does."""
    r = cfg.actor_rollout_ref.rollout
    return SliceSampling(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                         max_tokens=cfg.data.max_response_length, seed=cfg.trainer.seed * 1_000_003 + step * 100_003,
                         prompts=tuple(slice_), logprobs=r.calculate_log_probs)


def score_once(rewards, layout, prompts: list, texts: list[str], truths: list, strict: bool):
    """(scores, errors) from the engine's first rank; the others get ([0.0, ...], []) and must
    take the scores from it (`share_scores`). Collective: with `strict`, a reward function that
    raised on any rank stops every rank, so none is left waiting in the next collective."""
    scores, errors, failure = [0.0] * len(texts), [], None
    if layout.leads_engine:
        try:
            scores, errors = rewards.score(prompts, texts, truths, strict=strict)
        except RewardFunctionError as e:
            failure = e
    if comm.agree(failure is not None):
        raise failure or RewardFunctionError("the reward function raised on another rank (reward.strict=true); "
                                             "its message is in that rank's output")
    return scores, errors


def share_scores(scores: list[float], where: list[int], total: int, leads: bool) -> list[float]:
    """The engine leaders' scores on every rank: `where[i]` is sample i's index among the step's
    `total` samples (each engine's slice disjoint). Collective; float64, so scores arrive exact."""
    flat = torch.zeros(total, dtype=torch.float64)
    if leads and where:
        flat[where] = torch.tensor(scores, dtype=torch.float64)
    flat = comm.all_reduce(flat)
    return flat[where].tolist() if where else []


def generate_and_score(engine, rewards, tokenizer, layout, rows: list, slice_: list[int], sampling: SliceSampling,
                       strict: bool, max_prompt_len: int, max_response_len: int, pad_id: int,
                       timing: dict) -> Shard:
    """This engine's samples of the prompts `rows[j] for j in slice_`, scored, as a padded `Shard`.
    The engine is released (asleep, if it may) before scoring; timings go to `timing`."""
    mine = [rows[j] for j in slice_]
    t = time.perf_counter()
    outs = engine.generate([row.input_ids for row in mine], sampling) if mine else []
    timing["timing/generate"] = time.perf_counter() - t
    timing.update(engine.release())
    t = time.perf_counter()
    texts = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    scores, errors = score_once(rewards, layout, [mine[o.prompt_index].prompt for o in outs], texts,
                                [mine[o.prompt_index].ground_truth for o in outs], strict)
    n = sampling.n
    scores = share_scores(scores, [slice_[o.prompt_index] * n + o.sample_index for o in outs], len(rows) * n,
                          layout.leads_engine)
    err_at = {e.index: str(e) for e in errors}
    samples = [Sample(slice_[o.prompt_index], o.sample_index, list(mine[o.prompt_index].input_ids),
                      list(o.token_ids), list(o.logprobs), o.finish_reason, float(s),
                      f"{mine[o.prompt_index].where}: {err_at[i]}" if i in err_at else None)
               for i, (o, s) in enumerate(zip(outs, scores))]
    _report_reward_errors(samples, errors)
    timing["timing/reward"] = time.perf_counter() - t
    return pad_batch(samples, max_prompt_len, max_response_len, pad_id)


def _report_reward_errors(samples: list[Sample], errors: list) -> None:
    """One line per failed sample (on the rank that scored it); after a reward timeout, one line
    for the unscored rest of the batch."""
    for s in sorted(samples, key=lambda s: (s.prompt_index, s.sample_index)):
        if s.reward_error and "not scored:" not in s.reward_error:
            print(f"mcore_rl: reward error (prompt {s.prompt_index}, sample {s.sample_index}): {s.reward_error}",
                  flush=True)
    unscored = [e for e in errors if e.error.startswith("not scored:")]
    if unscored:
        print(f"mcore_rl: reward error: {len(unscored)} more samples {unscored[0].error}", flush=True)


def reward_metrics(local: Shard, leads_engine: bool) -> dict:
    """Mean / max / min score over every sample of the step (each engine counted once). Collective."""
    lead = leads_engine and len(local) > 0
    s = local.scores
    total, count = comm.all_reduce(torch.stack([s.sum(), torch.tensor(float(len(s)))]) if lead else torch.zeros(2))
    hi, neg_lo = comm.all_reduce(torch.stack([s.max(), -s.min()]) if lead else torch.full((2,), -float("inf")),
                                 op="max")
    return {"reward/mean": float(total / count), "reward/max": float(hi), "reward/min": float(-neg_lo)}
