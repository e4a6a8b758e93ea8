"""MATH-style scorer: is the response's final answer equivalent to the ground truth?

With the ``math-verify`` package installed (``pip install mcore-rl[math]``) answers are compared
symbolically (``\\frac{1}{2}`` == ``0.5`` == ``\\dfrac12``), which is what current math RL recipes
use. Without it, the fallback is a normalized exact match of the last ``\\boxed{...}`` of the
response against the ground truth: cruder, but dependency-free and deterministic.
"""

from __future__ import annotations

import re
import threading

try:  # optional dependency
    import math_verify as _math_verify
except ImportError:  # pragma: no cover - depends on the environment
    _math_verify = None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces; None if absent."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    spaced = re.match(r"\\(?:boxed|fbox)\s+([^\s{$][^\s$]*)", rest)  # "\boxed 5"
    if spaced:
        return spaced.group(1)
    start = rest.find("{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[start + 1 : i]
    return None  # unbalanced: truncated response


_REMOVE = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "$", "^\\circ", "^{\\circ}",
           "\\%", "%", "\\$"]


def normalize_answer(ans: str) -> str:
    """Canonical string form of a final answer, for the exact-match fallback."""
    s = ans.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^{}]*)\}", r"\1", s)
    for tok in _REMOVE:
        s = s.replace(tok, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?[\d,]*\.?\d+", s):  # plain number: drop thousands separators, trailing zeros
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        if s.startswith("0") and len(s) > 1 and not s.startswith("0."):
            s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return s


def _gold_text(ground_truth) -> str:
    text = str(ground_truth)
    boxed = last_boxed(text)  # a worked solution as ground truth: take its boxed answer
    return boxed if boxed is not None else text


def exact_match_score(prompt: str, response: str, ground_truth) -> float:
    """1.0 iff the last ``\\boxed{}`` of the response equals the ground truth after normalization."""
    pred = last_boxed(response)
    if pred is None:
        return 0.0
    return float(normalize_answer(pred) == normalize_answer(_gold_text(ground_truth)))


def math_verify_score(prompt: str, response: str, ground_truth) -> float:
    """1.0 iff math-verify finds the response's answer equivalent to the ground truth."""
    if _math_verify is None:
        raise ImportError("math_verify_score needs the math-verify package: pip install math-verify")
    # math-verify's timeouts use signal.alarm, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = _math_verify.parse("\\boxed{" + _gold_text(ground_truth) + "}", parsing_timeout=timeout)
    pred = _math_verify.parse(response, parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return float(_math_verify.verify(gold, pred, timeout_seconds=timeout))


def compute_score(prompt: str, response: str, ground_truth) -> float:
    """math-verify when importable, else the normalized exact match of the last ``\\boxed{}``."""
    if _math_verify is not None:
        return math_verify_score(prompt, response, ground_truth)
    return exact_match_score(prompt, response, ground_truth)
