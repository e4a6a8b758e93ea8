"""GSM8K scorer following verl's ``gsm8k.compute_score``, so scores carry over from verl recipes.

Two extraction methods:

* ``strict`` (verl's default): only a ``#### <number>`` in the response counts; the last one wins.
  It rewards the format as well as the answer, which is what GSM8K RL recipes train for.
* ``flexible``: the ``#### <number>`` form when present, otherwise the last number in the response.
  Gives signal to a model that answers right but never learned the ``####`` convention.

Numbers compare after dropping ``,`` and ``$`` and a trailing ``.``, and numerically, so ``1,000``,
``1000`` and ``1000.00`` are the same answer (a little more lenient than verl: ``####72`` and
``#### $72`` count too).
"""

from __future__ import annotations

import re

_CLIP_CHARS = 300  # regexes on a very long response are slow; the answer is at the end anyway
_STRICT_RE = re.compile(r"#### *(\-?[0-9\.\,\$]+)")
_NUMBER_RE = re.compile(r"(\-?[\$]?[0-9\.\,]+)")


def _clean(num: str) -> str:
    return num.replace(",", "").replace("$", "").rstrip(".")


def extract_answer(response: str, method: str = "strict") -> str | None:
    """The response's final answer as a cleaned number string, or None when there is none."""
    if method not in ("strict", "flexible"):
        raise ValueError(f"gsm8k method must be 'strict' or 'flexible', got {method!r}")
    text = response[-_CLIP_CHARS:]
    found = [_clean(m) for m in _STRICT_RE.findall(text)]
    found = [f for f in found if f not in ("", "-")]
    if found:
        return found[-1]
    if method == "strict":
        return None
    for cand in reversed(_NUMBER_RE.findall(text)):
        cand = _clean(cand)
        if cand not in ("", "-", "."):
            return cand
    return None


def extract_ground_truth(ground_truth) -> str:
    """GSM8K's answer column is a worked solution ending in ``#### 72``; a bare ``72`` works too."""
    text = str(ground_truth)
    if "####" in text:
        text = text.split("####")[-1]
    return _clean(text.strip())


def _same_number(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


def compute_score(prompt: str, response: str, ground_truth, method: str = "strict",
                  format_score: float = 0.0, score: float = 1.0) -> float:
    """`score` for a right answer, `format_score` for a wrong but extractable one, else 0."""
    answer = extract_answer(response, method)
    if answer is None:
        return 0.0
    return score if _same_number(answer, extract_ground_truth(ground_truth)) else format_score


def gsm8k_strict(prompt: str, response: str, ground_truth) -> float:
    return compute_score(prompt, response, ground_truth, method="strict")


def gsm8k_flexible(prompt: str, response: str, ground_truth) -> float:
    return compute_score(prompt, response, ground_truth, method="flexible")
