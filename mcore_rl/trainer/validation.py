"""Validation: the actor's reward on held-out prompts (`data.val_files`), every `trainer.test_freq` steps.

Each rollout engine generates its share of the validation prompts (prompt k goes to engine
k mod engines) with `rollout.val_kwargs` sampling, at the actor's current weights; every
engine reduces its prompts to a few sums and one all-reduce makes them batch-wide:

- val/reward/mean@n: mean score over the n samples of every prompt;
- val/reward/best@n: mean over prompts of the best of their n scores;
- val/reward/pass@k (k = 1, 2, 4, ... and n): the chance that at least one of k samples drawn
  (without replacement) from a prompt's n passes, averaged over prompts; a sample passes when
  it scores at least 1 (a full score). The unbiased estimator of Chen et al. 2021 (Codex).
- val/response/length_mean.

The samples' seeds depend on the trainer's seed and the prompt only, so successive validations
see the same random draws and differ by the weights alone.
"""

from __future__ import annotations

import math
import time

import torch

from mcore_rl.distributed import comm
from mcore_rl.data import load_prompts
from mcore_rl.trainer.rollouts import SliceSampling, score_once

PASS_SCORE = 1.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples, drawn without replacement from n of which c pass, passes)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k of pass@k reported for n samples: powers of two below n, and n."""
    return [k for k in (2 ** i for i in range(n.bit_length())) if k < n] + [n]


def prompt_sums(scores: list[list[float]], n: int) -> list[float]:
    """[prompts, sum of scores, sum of best scores, sum of pass@k for each k of `pass_ks(n)`]
    over prompts given as their n scores each (what one engine adds to the all-reduce)."""
    ks = pass_ks(n)
    sums = [0.0] * (3 + len(ks))
    for s in scores:
        c = sum(x >= PASS_SCORE for x in s)
        row = [1.0, sum(s), max(s)] + [pass_at_k(n, c, k) for k in ks]
        sums = [a + b for a, b in zip(sums, row)]
    return sums


def sums_size(n: int) -> int:
    """Length of `engine_sums`' result for n samples per prompt."""
    return 3 + len(pass_ks(n)) + 2


def val_metrics(sums: list[float], n: int, response_tokens: float) -> dict[str, float]:
    """`val/...` metrics from batch-wide `prompt_sums` and the total response tokens."""
    prompts = max(sums[0], 1.0)
    out = {f"val/reward/mean@{n}": sums[1] / (prompts * n), f"val/reward/best@{n}": sums[2] / prompts}
    out.update({f"val/reward/pass@{k}": v / prompts for k, v in zip(pass_ks(n), sums[3:])})
    out["val/response/length_mean"] = response_tokens / (prompts * n)
    return out


def load_val_dataset(cfg, tokenizer):
    """The validation prompts of `data.val_files` (None: no validation). `toy` is the toy task's
    own split; a folder is read at its `test` split (verl's data/<name>/test.parquet)."""
    from omegaconf import ListConfig

    d = cfg.data
    if d.val_files is None:
        return None
    files = [str(f) for f in d.val_files] if isinstance(d.val_files, (list, ListConfig)) else str(d.val_files)
    template = {"auto": None, True: True, False: False, "true": True, "false": False}[d.apply_chat_template]
    return load_prompts(files, prompt_key=d.prompt_key, answer_key=d.answer_key, split="test", tokenizer=tokenizer,
                        max_prompt_length=d.max_prompt_length, apply_chat_template=template, on_bad_row=d.on_bad_row)


def validate(trainer) -> dict[str, float]:
    """Collective over the training ranks: generate and score the validation prompts at the actor's
    current weights (with split placement the rollout ranks do, see `mcore_rl.trainer.split`)."""
    t0 = time.perf_counter()
    if trainer.bridge is not None:
        total = trainer.validate_on_rollout_ranks()
    else:
        trainer._sync_weights({})
        total = engine_sums(trainer.engine, trainer.rewards, trainer.tokenizer, trainer.layout, trainer.val_dataset,
                            trainer.cfg)
    metrics = val_metrics(total[:-2], trainer.cfg.actor_rollout_ref.rollout.val_kwargs.n, total[-2])
    if total[-1]:
        metrics["val/reward_errors"] = total[-1]
    metrics["timing/val"] = time.perf_counter() - t0
    return metrics


def engine_sums(engine, rewards, tokenizer, layout, rows, cfg) -> list[float]:
    """Collective over the ranks of the rollout engines: each engine generates and scores its share
    of the validation prompts `rows`; returns the batch-wide `prompt_sums`, then the response tokens
    and the reward errors."""
    v = cfg.actor_rollout_ref.rollout.val_kwargs
    mine = list(range(layout.me.rollout_dp, len(rows), layout.rollout_dp))
    sampling = SliceSampling(n=v.n, temperature=v.temperature if v.do_sample else 0.0, top_p=v.top_p, top_k=v.top_k,
                             max_tokens=cfg.data.max_response_length,
                             seed=cfg.trainer.seed * 1_000_003 + 999_983, prompts=tuple(mine),
                             logprobs=False)  # (validation scores the text only)
    outs = engine.generate([rows[j].input_ids for j in mine], sampling) if mine else []
    engine.release()
    texts = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    scores, errors = score_once(rewards, layout, [rows[mine[o.prompt_index]].prompt for o in outs], texts,
                                [rows[mine[o.prompt_index]].ground_truth for o in outs], cfg.reward.strict)
    per_prompt: list[list[float]] = [[] for _ in mine]
    for o, s in zip(outs, scores):
        per_prompt[o.prompt_index].append(float(s))
    local = prompt_sums(per_prompt, v.n) + [float(sum(len(o.token_ids) for o in outs)), float(len(errors))]
    if not layout.leads_engine:
        local = [0.0] * len(local)  # the engine's other ranks hold the same samples, unscored
    return comm.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()


def val_line(step: int, m: dict) -> str:
    """The console line of a validation."""
    shown = ", ".join(f"{k[4:]} {v:.3f}" for k, v in m.items() if k.startswith("val/reward"))
    return f"mcore_rl: validation at step {step}: {shown} ({m['timing/val']:.1f}s)"
