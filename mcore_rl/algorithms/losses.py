"""PPO-family losses: clipped policy loss (and its GSPO / CISPO variants), clipped value loss, KL estimators, entropy.

Inputs are per-token `[B, T]` tensors with a `mask` that is true on response tokens. Padded slots
may hold anything (even NaN): they are selected away with `torch.where` before any arithmetic
that could spread them, so they reach neither the loss nor the gradients.

`is_weights` (optional, `[B, T]`, no gradient) multiplies each token's policy loss after the clip:
the rollout/training mismatch correction of `rollout_correction.py` (verl's `rollout_is_weights`).

Metrics come back as detached 0-dim tensors, not Python floats, so the trainer can all-reduce
them across ranks and sync with the device once per step instead of once per metric.
"""

from __future__ import annotations

import torch

from mcore_rl.algorithms.utils import masked_mean

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _zero_pad(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _weighted(loss_mat: torch.Tensor, is_weights: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    """The per-token loss times the rollout importance weights (none: unchanged)."""
    if is_weights is None:
        return loss_mat
    return loss_mat * _zero_pad(is_weights.detach().to(loss_mat.dtype), m)


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar.

    - "token-mean": every valid token weighs the same (DAPO); long answers get more say.
    - "seq-mean-token-mean": mean within each sequence, then over sequences (original GRPO);
      every sequence weighs the same, so each token of a long answer weighs less.
    - "seq-mean-token-sum": sum within each sequence, then mean over sequences.
    - "seq-mean-token-sum-norm": as above but each sum divided by a constant `norm_len`
      (default T, the padded length; pass the max response length to keep it constant),
      removing the length bias without per-sequence normalisation (Dr.GRPO).

    Sequences without a valid token do not count in the sequence mean. `denominator` replaces
    the local count (valid tokens for "token-mean", sequences otherwise): under gradient
    accumulation or data parallelism, pass the count over the whole mini-batch so the summed
    micro-batch gradients equal those of one big batch.
    """
    m = mask.bool()
    per_tok = _zero_pad(loss_mat, m)
    if agg == "token-mean":
        total, count = per_tok.sum(), m.sum()
    elif agg in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        lengths = m.sum(-1)
        seq = per_tok.sum(-1)
        if agg == "seq-mean-token-mean":
            seq = seq / lengths.clamp(min=1).to(seq.dtype)
        elif agg == "seq-mean-token-sum-norm":
            seq = seq / (norm_len if norm_len is not None else loss_mat.shape[-1])
        total, count = seq.sum(), (lengths > 0).sum()
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid: {list(AGG_MODES)}")
    if denominator is None:
        denominator = count.clamp(min=1).to(total.dtype)
    return total / denominator


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
    norm_len: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss; returns (loss, metrics).

    The ratio is clipped to [1 - clip_low, 1 + clip_high]. A larger `clip_high` (DAPO's
    clip-higher, e.g. 0.28) lets low-probability tokens with positive advantage grow further,
    which keeps entropy from collapsing.

    Dual clip (`dual_clip_c`, e.g. 3.0): for a negative advantage the clipped objective is
    unbounded as the ratio grows, so a token the policy has already moved far towards can
    dominate the batch; the loss is capped at -A * c. Positive advantages are untouched.

    Metrics: clipfrac (tokens where the clipped branch is active), clipfrac_lower (tokens where
    the dual-clip cap is active), approx_kl (k1 estimate of KL(old || new)), ratio_mean.
    """
    m = mask.bool()
    log_ratio = _zero_pad(logp - old_logp, m).clamp(-20.0, 20.0)
    adv = _zero_pad(advantages, m)
    ratio = torch.exp(log_ratio)

    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), m)

    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        cap = -adv * dual_clip_c
        capped = (adv < 0) & (loss_mat > cap)
        loss_mat = torch.where(capped, cap, loss_mat)
        clipfrac_lower = masked_mean(capped.float(), m)
    else:
        clipfrac_lower = torch.zeros((), device=logp.device)

    loss_mat = _weighted(loss_mat, is_weights, m)
    loss = agg_loss(loss_mat, m, agg, denominator=denominator, norm_len=norm_len)
    metrics = {
        "clipfrac": clipfrac.detach(),
        "clipfrac_lower": clipfrac_lower.detach(),
        "approx_kl": masked_mean(-log_ratio, m).detach(),
        "ratio_mean": masked_mean(ratio, m).detach(),
    }
    return loss, metrics


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip_c: float | None = None,
    agg: str = "seq-mean-token-mean",
    denominator: float | torch.Tensor | None = None,
    norm_len: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Group Sequence Policy Optimization, arXiv 2507.18071); returns (loss, metrics).

    The importance ratio is taken per sequence, s_i = exp(mean_t (logp_t - old_logp_t)) (the
    length-normalised likelihood ratio), and each token uses s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]):
    its value is s_i, its gradient that of the token's own log-prob scaled by s_i. Loss per token
    -min(s_i,t * A_t, clip(s_i,t, 1 - clip_low, 1 + clip_high) * A_t); the clip ranges are far
    smaller than PPO's (the paper uses 3e-4 / 4e-4), set them through clip_ratio_low/high.

    Aggregation is always "seq-mean-token-mean" (mean over each response, then over responses),
    the paper's objective and what verl's `compute_policy_loss_gspo` hard-codes: `agg` and
    `norm_len` are accepted for a uniform signature and ignored; `denominator`, when given, must
    be the number of sequences. `dual_clip_c` is ignored too (verl's GSPO has no dual clip).
    The sequence log-ratio is clamped to [-20, 20] on its detached value, so the clamp never
    cuts a gradient. Metrics as `policy_loss`; clipfrac_lower is 0.
    """
    del agg, norm_len, dual_clip_c
    m = mask.bool()
    lp = _zero_pad(logp, m)
    log_ratio = _zero_pad(logp - old_logp, m)
    lengths = m.sum(-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)
    seq_log_ratio = (log_ratio.sum(-1, keepdim=True) / lengths).clamp(-20.0, 20.0).detach()
    # (lp - sg[lp]) is exactly 0 in value, so the value is exactly s_i (order as in verl).
    ratio = torch.exp(lp - lp.detach() + seq_log_ratio)
    adv = _zero_pad(advantages, m)

    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = _weighted(torch.maximum(loss_unclipped, loss_clipped), is_weights, m)
    loss = agg_loss(loss_mat, m, "seq-mean-token-mean", denominator=denominator)
    metrics = {
        "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), m).detach(),
        "clipfrac_lower": torch.zeros((), device=logp.device),
        "approx_kl": masked_mean(-log_ratio, m).detach(),
        "ratio_mean": masked_mean(ratio, m).detach(),
    }
    return loss, metrics


def cispo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
    norm_len: int | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (Clipped IS-weight Policy Optimization, MiniMax-M1, arXiv 2506.13585); returns (loss, metrics).

    Per token loss -sg[clip(r_t, 1 - clip_low, 1 + clip_high)] * A_t * logp_t with
    r_t = exp(logp_t - old_logp_t): the importance weight is clipped and stop-gradiented, and the
    gradient flows through logp_t alone. Unlike PPO's clipped surrogate, no token loses its
    gradient when its ratio leaves the range; the clip only bounds its weight.

    Aggregated with `agg` like `policy_loss` (default token-mean, as verl's
    `compute_policy_loss_cispo`); `dual_clip_c` is ignored (the weight is bounded already).
    Metrics as `policy_loss`: clipfrac is the fraction of tokens whose weight was clipped;
    clipfrac_lower is 0. The loss value is a REINFORCE-style -w * A * logp, not comparable in
    magnitude with the PPO surrogate's.
    """
    del dual_clip_c
    m = mask.bool()
    lp = _zero_pad(logp, m)
    log_ratio = _zero_pad(logp - old_logp, m).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio).detach()
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    adv = _zero_pad(advantages, m)
    loss_mat = _weighted(-weight * adv * lp, is_weights, m)
    loss = agg_loss(loss_mat, m, agg, denominator=denominator, norm_len=norm_len)
    metrics = {
        "clipfrac": masked_mean((weight != ratio).float(), m).detach(),
        "clipfrac_lower": torch.zeros((), device=logp.device),
        "approx_kl": masked_mean(-log_ratio, m).detach(),
        "ratio_mean": masked_mean(ratio, m).detach(),
    }
    return loss, metrics


POLICY_LOSSES = {"vanilla": policy_loss, "gspo": gspo_policy_loss, "cispo": cispo_policy_loss}


def get_policy_loss(name: str):
    """The policy-loss function for `actor.policy_loss` (vanilla | gspo | cispo); same signature."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid: {list(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    denominator: float | torch.Tensor | None = None,
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss 0.5 * max((V - R)^2, (V_clipped - R)^2); returns (loss, metrics).

    V_clipped keeps the new prediction within `clip` of the value it had at rollout time, the
    value-side analogue of the ratio clip: one noisy return cannot drag the critic far in a single
    PPO epoch. Taking the max makes it pessimistic. `clip=None` gives plain 0.5 * MSE.
    Metrics: vf_clipfrac (tokens moved past the clip whose clipped error is the larger one;
    ``old + (v - old)`` can round above ``v`` in float, so the comparison alone counts ties).
    """
    m = mask.bool()
    v = _zero_pad(values, m)
    ret = _zero_pad(returns, m)
    err = (v - ret).pow(2)
    if clip is not None:
        old = _zero_pad(old_values, m)
        v_clipped = old + (v - old).clamp(-clip, clip)
        err_clipped = (v_clipped - ret).pow(2)
        clipfrac = masked_mean((((v - old).abs() > clip) & (err_clipped > err)).float(), m)
        err = torch.maximum(err, err_clipped)
    else:
        clipfrac = torch.zeros((), device=values.device)
    loss = 0.5 * agg_loss(err, m, agg, denominator=denominator, norm_len=norm_len)
    return loss, {"vf_clipfrac": clipfrac.detach()}


KL_KINDS = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3", "abs": "abs"}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    - "k1" / "kl": logp - ref_logp. Unbiased, high variance, can be negative per token.
    - "k2" / "mse": 0.5 * (logp - ref_logp)^2. Biased, always >= 0; its gradient is that of KL.
    - "k3" / "low_var_kl": exp(ref - logp) - (ref - logp) - 1. Unbiased, >= 0, low variance
      (Schulman's estimator). Log-ratio clamped to [-20, 20] and result to [-10, 10] as in verl,
      so one wildly off token cannot blow up the loss.
    - "abs": |logp - ref_logp|.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {sorted(KL_KINDS)}")
    kind = KL_KINDS[kind]
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.pow(2)
    if kind == "abs":
        return diff.abs()
    log_ratio = (-diff).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(z) - sum(softmax(z) * z).

    Written this way no log of a probability is taken: a (finite) logit whose probability
    underflows to 0 contributes 0 * z rather than 0 * log(0) = NaN, and large logits do not
    overflow.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


@torch.no_grad()
def apply_kl_in_reward(
    token_scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards = scores - kl_coef * KL(pi || pi_ref) per token; returns (rewards, mean KL).

    The classic RLHF set-up (PPO with a critic): the KL enters the return, so the critic learns to
    anticipate it. The mean KL is averaged per sequence first, then over sequences (as in verl);
    it is what an adaptive KL controller should track.
    """
    m = mask.bool()
    kl = _zero_pad(kl_penalty(logp, ref_logp, kind), m)
    rewards = _zero_pad(token_scores - kl_coef * kl, m)
    has_tokens = m.any(-1)
    per_seq = masked_mean(kl, m, dim=-1)
    mean_kl = masked_mean(per_seq, has_tokens)
    return rewards, mean_kl
