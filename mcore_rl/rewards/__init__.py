"""Reward functions: built-ins, user functions by name, and batch scoring that never fails silently.

A reward function has the signature ``fn(prompt: str, response: str, ground_truth) -> float``; it
may also return a dict with a ``"score"`` key (other keys are extra metrics, kept for logging).

``get_reward_fn(spec)`` resolves a spec: a built-in name (``toy``, ``gsm8k``, ``gsm8k_flexible``,
``math``, ``math_exact``), ``package.module:function``, or ``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from mcore_rl.rewards import gsm8k as _gsm8k
from mcore_rl.rewards import math_answer as _math

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, Any], "float | dict"]


def _toy(prompt: str, response: str, ground_truth) -> float:
    from mcore_rl.toy import toy_reward

    return toy_reward(prompt, response, ground_truth)


BUILTINS: dict[str, RewardFn] = {
    "toy": _toy,
    "gsm8k": _gsm8k.gsm8k_strict,  # verl's default: only "#### <answer>" counts
    "gsm8k_flexible": _gsm8k.gsm8k_flexible,  # "#### <answer>", else the last number
    "math": _math.compute_score,  # math-verify when installed, else exact match of the last \boxed{}
    "math_exact": _math.exact_match_score,  # always the dependency-free exact match
}


class RewardSpecError(ValueError):
    """A reward spec that names nothing loadable; the message says what is missing and where."""


def _load_module_from_file(path: str):
    if not os.path.isfile(path):
        raise RewardSpecError(f"reward function file not found: {path!r}")
    name = "mcore_rl_user_reward_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RewardSpecError(f"cannot import reward function file {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so pickling and dataclasses inside the file work
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise RewardSpecError(f"importing reward function file {path!r} failed: {type(e).__name__}: {e}") from e
    return module


def get_reward_fn(spec: str | Callable) -> RewardFn:
    """The reward function named by `spec` (a callable is returned as is).

    ``module:function`` imports a module from the Python path; ``file.py:function`` loads a file.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"reward spec must be a non-empty string or a callable, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        raise RewardSpecError(
            f"unknown reward {spec!r}; built-ins: {', '.join(BUILTINS)}; "
            "or give a user function as 'package.module:function' or 'path/to/file.py:function'"
        )
    where, _, fn_name = spec.rpartition(":")
    if not where or not fn_name:
        raise RewardSpecError(f"reward spec {spec!r} must look like 'module:function' or 'file.py:function'")
    if where.endswith(".py") or os.sep in where or "/" in where:
        module = _load_module_from_file(where)
        origin = f"file {where!r}"
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise RewardSpecError(f"reward module {where!r} not found ({e}); is it on PYTHONPATH?") from e
        origin = f"module {where!r}"
    fn = getattr(module, fn_name, None)
    if fn is None:
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardSpecError(f"{origin} has no function {fn_name!r}; "
                              f"callables in it: {', '.join(available) or 'none'}")
    if not callable(fn):
        raise RewardSpecError(f"{fn_name!r} in {origin} is not callable (it is a {type(fn).__name__})")
    return fn


def _excerpt(text: Any, n: int = 80) -> str:
    s = str(text)
    return repr(s if len(s) <= n else s[: n // 2] + " ... " + s[-n // 2 :])


@dataclass
class ScoreError:
    """A sample whose reward could not be computed (it was scored 0)."""

    index: int
    error: str
    prompt: str
    response: str

    def __str__(self) -> str:
        return (f"reward failed on sample {self.index}: {self.error} "
                f"(prompt {_excerpt(self.prompt)}, response {_excerpt(self.response)})")


class RewardFunctionError(RuntimeError):
    """Raised by `score_batch(..., strict=True)`; the message names the sample."""


def _to_score(value) -> float:
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"reward dict has no 'score' key (keys: {sorted(value)})")
        value = value["score"]
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"reward must be a number or a dict with 'score', got {type(value).__name__}")
    score = float(value)
    if math.isnan(score) or math.isinf(score):
        raise ValueError(f"reward is {score}")
    return score


def score_one(fn: RewardFn, prompt, response, ground_truth) -> tuple[float, Exception | None, dict]:
    """(score, the exception or None, extra keys) of one sample; a failure scores 0."""
    try:
        value = fn(prompt, response, ground_truth)
        extra = {k: v for k, v in value.items() if k != "score"} if isinstance(value, dict) else {}
        return _to_score(value), None, extra
    except Exception as e:
        return 0.0, e, {}


def describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def score_batch(fn: RewardFn | str, prompts, responses, ground_truths=None, strict: bool = False,
                extras: list | None = None) -> tuple[list[float], list[ScoreError]]:
    """Score each (prompt, response, ground_truth); returns (scores, errors).

    A raising reward function (or one returning NaN, None, or a dict without "score") must not
    kill a long run for one odd sample, nor go unnoticed: the sample scores 0, a ScoreError with
    its index and excerpts is returned and logged. With ``strict=True`` the first failure raises
    `RewardFunctionError` instead. Pass a list as `extras` to collect each dict result's extra keys.
    """
    fn = get_reward_fn(fn)
    n = len(responses)
    if len(prompts) != n:
        raise ValueError(f"score_batch: {len(prompts)} prompts but {n} responses")
    if ground_truths is None:
        ground_truths = [None] * n
    elif len(ground_truths) != n:
        raise ValueError(f"score_batch: {len(ground_truths)} ground truths but {n} responses")
    scores: list[float] = []
    errors: list[ScoreError] = []
    for i, (p, r, g) in enumerate(zip(prompts, responses, ground_truths)):
        score, error, extra = score_one(fn, p, r, g)
        if error is not None:
            err = ScoreError(i, describe(error), str(p), str(r))
            if strict:
                raise RewardFunctionError(str(err)) from error
            errors.append(err)
        scores.append(score)
        if extras is not None:
            extras.append(extra)
    if errors:
        logger.warning("%d of %d rewards failed and were scored 0; first: %s", len(errors), n, errors[0])
    return scores, errors


from mcore_rl.rewards.scorer import RewardScorer  # noqa: E402  (it uses the names above)

__all__ = ["BUILTINS", "RewardFn", "RewardFunctionError", "RewardScorer", "RewardSpecError", "ScoreError",
           "describe", "get_reward_fn", "score_batch", "score_one"]
