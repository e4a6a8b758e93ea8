"""Reward functions: built-ins on hand-written examples, spec resolution, batch scoring errors."""

import logging
import textwrap

import pytest

from mcore_rl.rewards import (
    BUILTINS,
    RewardFunctionError,
    RewardSpecError,
    ScoreError,
    get_reward_fn,
    score_batch,
)
from mcore_rl.rewards import gsm8k, math_answer

pytestmark = pytest.mark.train

GSM_GT = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72"


# ------------------------------------------------------------------------------------------- gsm8k


@pytest.mark.parametrize("response,strict,flexible", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", 1.0, 1.0),
    ("#### 70\nwait, no\n#### 72", 1.0, 1.0),           # the last #### wins
    ("#### 72\nwait, no\n#### 70", 0.0, 0.0),
    ("so the answer is 72", 0.0, 1.0),                   # no ####: only flexible takes the last number
    ("72 clips, or maybe 71", 0.0, 0.0),                 # flexible takes the *last* number
    ("#### 72.", 1.0, 1.0),                              # trailing period
    ("#### 72.00", 1.0, 1.0),                            # numeric comparison
    ("no idea", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_gsm8k_strict_and_flexible(response, strict, flexible):
    assert get_reward_fn("gsm8k")("q", response, GSM_GT) == strict
    assert get_reward_fn("gsm8k_flexible")("q", response, GSM_GT) == flexible


def test_gsm8k_thousands_and_bare_ground_truth():
    assert gsm8k.gsm8k_strict("q", "#### 1,234", "1234") == 1.0
    assert gsm8k.gsm8k_strict("q", "#### $1,234", "#### 1,234") == 1.0
    assert gsm8k.gsm8k_strict("q", "#### -5", "-5") == 1.0
    assert gsm8k.gsm8k_strict("q", "#### 5", "-5") == 0.0
    assert gsm8k.extract_answer("The total is 3,000.", "flexible") == "3000"
    assert gsm8k.extract_answer("The total is 3,000.", "strict") is None
    assert gsm8k.compute_score("q", "#### 9", "72", format_score=0.1) == 0.1


# ------------------------------------------------------------------------------------------- math


def test_last_boxed_nested_and_missing():
    assert math_answer.last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert math_answer.last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert math_answer.last_boxed(r"so $\boxed 7$.") == "7"
    assert math_answer.last_boxed("no box") is None
    assert math_answer.last_boxed(r"\boxed{\frac{1}{2}") is None  # truncated


@pytest.mark.parametrize("pred,gt,ok", [
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac12}", r"\frac{1}{2}", 1.0),
    (r"\boxed{ 10 }", "10", 1.0),
    (r"\boxed{10.0}", "10", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{\text{(B)}}", "(B)", 1.0),
    (r"\boxed{11}", "10", 0.0),
    ("10", "10", 0.0),  # no \boxed: the fallback finds no final answer
    (r"\boxed{3}", r"The answer is \boxed{3}.", 1.0),  # ground truth as a worked solution
])
def test_math_exact_fallback(pred, gt, ok):
    assert get_reward_fn("math_exact")("q", "Work... " + pred, gt) == ok


def test_math_uses_exact_match_without_math_verify(monkeypatch):
    monkeypatch.setattr(math_answer, "_math_verify", None)
    fn = get_reward_fn("math")
    assert fn("q", r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}") == 1.0
    assert fn("q", r"\boxed{0.5}", r"\frac{1}{2}") == 0.0  # only math-verify sees these as equal
    with pytest.raises(ImportError, match="math-verify"):
        math_answer.math_verify_score("q", r"\boxed{1}", "1")


def test_math_verify_symbolic():
    pytest.importorskip("math_verify")
    fn = get_reward_fn("math")
    assert fn("q", r"The answer is $\boxed{0.5}$.", r"\frac{1}{2}") == 1.0
    assert fn("q", r"The answer is $\boxed{\frac{2}{4}}$.", r"\frac{1}{2}") == 1.0
    assert fn("q", r"The answer is $\boxed{\frac{1}{3}}$.", r"\frac{1}{2}") == 0.0


# ------------------------------------------------------------------------------------------- toy


def test_toy_builtin_depends_on_prompt():
    fn = get_reward_fn("toy")
    assert fn("7:", "77777777", None) == 1.0
    assert fn("3:", "77777777", None) == 0.0
    assert fn("7:", "7777", None) == 0.5  # short answers count missing characters as wrong
    assert fn("7:", "77x77777", "7") == 7 / 8


# ------------------------------------------------------------------------------------------- specs


def test_unknown_name_lists_builtins():
    with pytest.raises(RewardSpecError) as e:
        get_reward_fn("gsm9k")
    for name in BUILTINS:
        assert name in str(e.value)


def test_module_function_spec():
    assert get_reward_fn("mcore_rl.rewards.gsm8k:gsm8k_flexible") is gsm8k.gsm8k_flexible
    with pytest.raises(RewardSpecError, match="no_such_mod"):
        get_reward_fn("no_such_mod.sub:fn")
    with pytest.raises(RewardSpecError, match="nope"):
        get_reward_fn("mcore_rl.rewards.gsm8k:nope")


def test_user_file_function(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(textwrap.dedent("""
        def length_reward(prompt, response, ground_truth):
            return {"score": min(len(response), 10) / 10, "len": len(response)}

        def other(prompt, response, ground_truth):
            return 1.0

        NOT_A_FN = 3
    """))
    fn = get_reward_fn(f"{f}:length_reward")
    extras = []
    scores, errors = score_batch(fn, ["p", "p"], ["abc", "x" * 20], [None, None], extras=extras)
    assert scores == [0.3, 1.0] and errors == []
    assert extras == [{"len": 3}, {"len": 20}]

    with pytest.raises(RewardSpecError) as e:
        get_reward_fn(f"{f}:missing_fn")
    assert "missing_fn" in str(e.value) and "my_reward.py" in str(e.value)
    assert "length_reward" in str(e.value) and "other" in str(e.value)  # lists what is there
    with pytest.raises(RewardSpecError, match="not callable"):
        get_reward_fn(f"{f}:NOT_A_FN")
    with pytest.raises(RewardSpecError, match="not found") as e:
        get_reward_fn(f"{tmp_path}/absent.py:fn")
    assert "absent.py" in str(e.value)


def test_user_file_with_import_error(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import not_a_real_package_xyz\n")
    with pytest.raises(RewardSpecError, match="broken.py.*not_a_real_package_xyz"):
        get_reward_fn(f"{f}:fn")


# ------------------------------------------------------------------------------------------- score_batch


def _flaky(prompt, response, ground_truth):
    if response == "boom":
        raise ZeroDivisionError("bad sample")
    if response == "nan":
        return float("nan")
    if response == "none":
        return None
    if response == "dict":
        return {"acc": 1}
    return 1.0


def test_score_batch_reports_failures_with_index_and_excerpt(caplog):
    prompts = ["p0", "the prompt of sample one", "p2", "p3", "p4", "p5"]
    responses = ["ok", "boom", "ok", "nan", "none", "dict"]
    with caplog.at_level(logging.WARNING):
        scores, errors = score_batch(_flaky, prompts, responses, [None] * 6)
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert [e.index for e in errors] == [1, 3, 4, 5]
    assert all(isinstance(e, ScoreError) for e in errors)
    msg = str(errors[0])
    assert "sample 1" in msg and "ZeroDivisionError" in msg and "bad sample" in msg
    assert "the prompt of sample one" in msg and "'boom'" in msg
    assert "no 'score' key" in str(errors[3])
    assert "4 of 6 rewards failed" in caplog.text


def test_score_batch_strict_raises_with_sample():
    with pytest.raises(RewardFunctionError, match="sample 1.*ZeroDivisionError") as e:
        score_batch(_flaky, ["a", "b"], ["ok", "boom"], strict=True)
    assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_score_batch_long_excerpt_is_clipped():
    _, errors = score_batch(_flaky, ["p" * 10_000], ["boom"])
    assert len(str(errors[0])) < 400


def test_score_batch_length_mismatch():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_batch("toy", ["1:", "2:"], ["1"])
    scores, errors = score_batch("toy", ["1:", "2:"], ["11111111", "1"], ["1", "2"])
    assert scores == [1.0, 0.0] and errors == []
