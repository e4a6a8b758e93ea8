"""`RewardScorer`: the trainer's reward scoring, bounded in time.

A reward function that never returns (a stuck regex, a judge API that does not answer) would
hang the run. With `reward.timeout_s` > 0 the function runs in a helper process that scores
the batch sample by sample and streams results back; when the batch's time is up the helper
is killed and the samples without a score are reported like those of a raising reward
function (score 0, or `RewardFunctionError` with `reward.strict`). The next batch gets a new
helper. With `timeout_s` 0 the function runs in the trainer's own process, unbounded.

The helper is spawned (a clean interpreter: forking a process that holds vLLM, gloo and OpenMP
threads is unsafe), ignores SIGINT/SIGTERM and dies with its rank (`mcore_rl.lifetime`).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.util as mp_util
import time

from mcore_rl.rewards import RewardFn, RewardFunctionError, ScoreError, describe, get_reward_fn, score_one

_START_S = 120  # how long a helper may take to start (a cold interpreter on a busy node)


def _kill(proc) -> None:
    """Stop a helper (it ignores SIGTERM, so multiprocessing's own exit hook cannot)."""
    if proc.is_alive():
        proc.kill()
    proc.join()


def _serve(spec, conn, parent_pid: int, pdeathsig: bool) -> None:
    """Helper process: score batches from `conn`, sending (index, score, error) back per sample."""
    from mcore_rl.lifetime import die_with_parent

    die_with_parent(parent_pid, pdeathsig)
    fn = get_reward_fn(spec)
    conn.send("ready")  # the batch's clock starts after this: interpreter start-up is not the function's time
    while True:
        try:
            prompts, responses, ground_truths = conn.recv()
        except (EOFError, OSError):  # the trainer closed the pipe (or went away: "connection reset")
            return
        for i, (p, r, g) in enumerate(zip(prompts, responses, ground_truths)):
            score, error, _ = score_one(fn, p, r, g)
            conn.send((i, score, error and describe(error)))  # one by one: a hang is pinned to its sample


class RewardScorer:
    """Scores batches with the reward function `spec`, each batch within `timeout_s` seconds."""

    def __init__(self, spec: str | RewardFn, timeout_s: float = 0):
        if timeout_s is None or timeout_s < 0:
            raise ValueError(f"reward.timeout_s={timeout_s}: must be >= 0 seconds (0: no limit)")
        self.fn = get_reward_fn(spec)  # a bad spec fails here, in the trainer's process
        self.spec, self.timeout_s = spec, float(timeout_s)
        self._proc = self._conn = self._finalizer = None
        self._ready = False
        if self.timeout_s:
            self._start()  # now: its interpreter starts while the models are built

    def _start(self) -> None:
        from mcore_rl.lifetime import graceful_signals_blocked, owner

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(self.spec, child, *owner()), daemon=True,
                                 name="mcore_rl-reward")
        with graceful_signals_blocked():
            self._proc.start()
        child.close()
        # at interpreter exit, and in a multiprocessing child (whose exit joins its children
        # before any atexit hook runs) before that join: the helper never blocks an exit
        self._finalizer = mp_util.Finalize(self, _kill, args=(self._proc,), exitpriority=100)

    def _stop(self) -> None:
        if self._proc is not None:
            self._conn.close()
            self._finalizer()  # kills and joins the helper, once
            self._proc = self._conn = self._finalizer = None
            self._ready = False

    def score(self, prompts, responses, ground_truths, strict: bool = False) -> tuple[list[float], list[ScoreError]]:
        """(scores, errors) as `score_batch`; with a timeout, no batch takes longer than it."""
        n = len(responses)
        if not self.timeout_s:
            results = {i: score_one(self.fn, p, r, g)[:2] for i, (p, r, g) in
                       enumerate(zip(prompts, responses, ground_truths))}
        else:
            results = self._score_in_helper(list(prompts), list(responses), list(ground_truths))
        scores, errors = [], []
        for i in range(n):
            score, error = results[i]
            if error is not None:
                errors.append(ScoreError(i, error if isinstance(error, str) else describe(error), str(prompts[i]),
                                         str(responses[i])))
                if strict:
                    raise RewardFunctionError(str(errors[-1])) from (error if isinstance(error, Exception) else None)
            scores.append(score)
        return scores, errors

    def _score_in_helper(self, prompts: list, responses: list, ground_truths: list) -> dict:
        if self._proc is None or not self._proc.is_alive():
            self._stop()
            self._start()
        results, why = {}, None
        try:
            if not self._ready:
                if not self._conn.poll(_START_S) or self._conn.recv() != "ready":
                    raise EOFError
                self._ready = True
            deadline = time.monotonic() + self.timeout_s
            self._conn.send((prompts, responses, ground_truths))
            while len(results) < len(responses):
                if not self._conn.poll(max(deadline - time.monotonic(), 0)):
                    why = f"the reward function did not return within reward.timeout_s={self.timeout_s:g} s"
                    break
                i, score, error = self._conn.recv()
                results[i] = (score, error)
        except (EOFError, OSError):  # the helper died: a crash in native code, os._exit in the function
            self._proc.join(timeout=5)
            why = f"the reward process died (exit code {self._proc.exitcode})"
        if why is not None:
            self._stop()  # a new helper for the next batch
            first = min(set(range(len(responses))) - set(results))
            results[first] = (0.0, why)
            for i in range(first + 1, len(responses)):
                results[i] = (0.0, f"not scored: the batch stopped at sample {first} ({why})")
        return results

    def close(self) -> None:
        self._stop()
