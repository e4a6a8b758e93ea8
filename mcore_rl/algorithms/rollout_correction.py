"""Rollout/training mismatch: importance weights between the rollout engine's log-probs and the trainer's.

The engine samples from pi_rollout (its own kernels, precision, temperature); the trainer's
"old" log-probs come from pi_old, the Megatron actor at the same weights. PPO's ratio
pi_theta / pi_old assumes the samples came from pi_old; the importance weight
w = pi_old / pi_rollout corrects for the difference. Per response token t of sequence i:

- level "token":     w_it = exp(old_it - rollout_it)
- level "sequence":  w_i  = exp(sum_t (old_it - rollout_it))    (the sequence likelihood ratio)
- level "geometric": w_i  = exp(mean_t (old_it - rollout_it))   (its per-token geometric mean)

Two ways to bound it (`mode`):
- "truncate" (TIS): w <- min(w, upper); every token stays in the loss.
- "mask" (MIS): tokens (token level) or whole sequences (sequence levels) whose w lies outside
  [lower, upper] are rejected: they leave the policy loss (numerator and denominator).
A `veto` threshold rejects any sequence holding a token with pi_old / pi_rollout below it
(a token the trainer thinks nearly impossible), in either mode.

The weight multiplies the per-token policy loss after PPO's clip, as in verl's `rollout_is`.
Log-ratios are clamped to [-20, 20] before `exp`, so a wild sequence cannot overflow.
Everything works on one rank's rows; batch-wide metrics come from `mismatch_sums` (sums, mins
and maxes that the caller all-reduces).
"""

from __future__ import annotations

import math

import torch

IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")
_BOUND = 20.0


def _log_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log w, [B, T] (sequence levels: each sequence's value on all its positions); 0 on padding."""
    m = mask.bool()
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    lr = torch.where(m, old_logp - rollout_logp, zero)
    if level == "token":
        return lr
    if level not in IS_LEVELS:
        raise ValueError(f"unknown rollout_is_level {level!r}; valid: {list(IS_LEVELS)}")
    seq = lr.sum(-1, keepdim=True)
    if level == "geometric":
        seq = seq / m.sum(-1, keepdim=True).clamp(min=1).to(seq.dtype)
    return torch.where(m, seq.expand_as(lr), zero)


def rollout_is_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
    threshold_lower: float | None = None,
    level: str = "token",
    mode: str = "truncate",
    veto_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, keep), both [B, T]: the importance weight of every token (0 where not kept) and
    the tokens that stay in the policy loss (`mask` minus rejected tokens / sequences).

    `threshold` is the upper bound; `threshold_lower` (mask mode) defaults to 1 / threshold.
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown rollout_is_mode {mode!r}; valid: {list(IS_MODES)}")
    upper = float(threshold)
    lower = 1.0 / upper if threshold_lower is None else float(threshold_lower)
    m = mask.bool()
    log_w = _log_weights(old_logp, rollout_logp, m, level)
    w = torch.exp(log_w.clamp(-_BOUND, _BOUND))
    keep = m.clone()
    if mode == "truncate":
        w = w.clamp(max=upper)
    else:  # compared in log space: exact even where exp would overflow
        keep &= (log_w >= math.log(lower)) & (log_w <= math.log(upper))
    if veto_threshold is not None:
        bad = m & (old_logp - rollout_logp < math.log(veto_threshold))
        keep &= ~bad.any(-1, keepdim=True)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.where(keep, w, zero), keep


# Order of the values `mismatch_sums` returns; the first group is summed over ranks, then
# one value min-reduced and one max-reduced.
MISMATCH_SUMS = ("tokens", "sequences", "kl", "k3_kl", "ratio", "is_weight", "truncated", "masked",
                 "rejected_sequences")


def mismatch_sums(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    threshold: float | None = None,
    threshold_lower: float | None = None,
    level: str = "token",
    mode: str = "truncate",
    veto_threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's contribution to the mismatch metrics: (sums in `MISMATCH_SUMS` order, min
    token ratio, max token ratio), float64.

    kl is the k1 estimate of KL(pi_rollout || pi_old) (sampled tokens come from the rollout),
    k3_kl Schulman's k3, ratio the token ratio pi_old / pi_rollout; with a `threshold`,
    is_weight sums the weights as `rollout_is_weights` gives them, truncated counts the tokens
    whose weight the truncation lowered (truncate mode), masked the response tokens rejected,
    rejected_sequences the sequences with no token left.
    """
    m = mask.bool()
    old, roll = old_logp.double(), rollout_logp.double()
    zero = torch.zeros((), dtype=torch.float64, device=old.device)
    d = torch.where(m, old - roll, zero).clamp(-_BOUND, _BOUND)  # log(pi_old / pi_rollout)
    ratio = torch.exp(d)
    k3 = ratio - d - 1.0  # k3 of KL(rollout || old) with samples from the rollout
    has = m.any(-1)
    sums = {"tokens": m.sum(), "sequences": has.sum(), "kl": torch.where(m, -d, zero).sum(),
            "k3_kl": torch.where(m, k3, zero).sum(), "ratio": torch.where(m, ratio, zero).sum(),
            "is_weight": zero, "truncated": zero, "masked": zero, "rejected_sequences": zero}
    if threshold is not None:
        w, keep = rollout_is_weights(old, roll, m, threshold, threshold_lower, level, mode, veto_threshold)
        sums["is_weight"] = w.sum()
        if mode == "truncate":
            raw = torch.exp(_log_weights(old, roll, m, level).clamp(-_BOUND, _BOUND))
            sums["truncated"] = (keep & (raw > threshold)).sum()
        sums["masked"] = (m & ~keep).sum()
        sums["rejected_sequences"] = (has & ~keep.any(-1)).sum()
    out = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=old.device) for k in MISMATCH_SUMS])
    lo = torch.where(m, ratio, torch.full_like(ratio, math.inf)).min() if m.any() else torch.tensor(math.inf)
    hi = torch.where(m, ratio, torch.full_like(ratio, -math.inf)).max() if m.any() else torch.tensor(-math.inf)
    return out, lo.double(), hi.double()


def mismatch_metrics(sums: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, with_is: bool) -> dict[str, float]:
    """Metrics (`mismatch/...`) from batch-wide `mismatch_sums` (already all-reduced); the
    weight statistics only `with_is` (a threshold was given)."""
    s = dict(zip(MISMATCH_SUMS, sums.tolist()))
    tokens, seqs = max(s["tokens"], 1.0), max(s["sequences"], 1.0)
    out = {"mismatch/kl": s["kl"] / tokens, "mismatch/k3_kl": s["k3_kl"] / tokens,
           "mismatch/ratio_mean": s["ratio"] / tokens, "mismatch/ratio_min": float(lo), "mismatch/ratio_max": float(hi)}
    if with_is:
        out.update({"mismatch/is_weight_mean": s["is_weight"] / tokens,
                    "mismatch/truncated_fraction": s["truncated"] / tokens,
                    "mismatch/masked_fraction": s["masked"] / tokens,
                    "mismatch/rejected_seq_fraction": s["rejected_sequences"] / seqs})
    return out


def rollout_is_problems(alg) -> list[str]:
    """What is wrong with the `algorithm.rollout_is*` settings (empty: fine); checked at load."""
    problems = []
    upper, lower, veto = alg.rollout_is_threshold, alg.rollout_is_threshold_lower, alg.rollout_is_veto_threshold
    for name, v in (("rollout_is_threshold", upper), ("rollout_is_threshold_lower", lower),
                    ("rollout_is_veto_threshold", veto)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            problems.append(f"algorithm.{name}={v!r} must be a positive number (or null)")
    if not problems and upper is not None and lower is not None and lower > upper:
        problems.append(f"algorithm.rollout_is_threshold_lower={lower} is above rollout_is_threshold={upper}")
    return problems
