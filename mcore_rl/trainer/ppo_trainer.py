"""The RL loop, SPMD and colocated: every rank runs this same code on its own shards.

One step (`PPOTrainer.train_step`): reshard the actor into the rollout engine -> each engine
generates and scores its slice of the step's prompts (rollouts.py) -> the step's prompt order
and each rank's training shard (shaping.py) -> old / reference log-probs and values on the
shard -> advantages (groups locally, whitening by all-reduced scalars) -> PPO epochs over
mini-batches (ppo_update.py) -> metrics. `fit` loops it with checkpoints, validation and signals.

Who does what is asked of one `Layout` (`self.layout`, built at start). A rank never holds
the step's whole batch; only scalars cross DP ranks. With split placement (split.py) these ranks
only train: the weights go out to the rollout ranks and each rank's slice of samples comes back.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from converters.checkpoint import export_hf
from mcore_rl.algorithms import apply_kl_in_reward, compute_advantages
from mcore_rl.config import check_sizes, launch_world_size, needs_reference, to_plain
from mcore_rl.distributed import comm, init_distributed
from mcore_rl.distributed.env import read_launch_env
from mcore_rl.distributed.layout import describe_layout, rank_layout
from mcore_rl.distributed.watchdog import stack_dump_after
from mcore_rl.models.arch import arch_from_hf_config
from mcore_rl.models.lora import disabled, lora_of, trainable_params
from mcore_rl.resharding import Resharder
from mcore_rl.trainer import build, checkpointing, rollouts, shaping, split
from mcore_rl.trainer.batch import Shard, last_token_rewards
from mcore_rl.trainer.inputs import load_inputs
from mcore_rl.trainer.ppo_update import compute_logprobs, compute_values, update_actor, update_critic
from mcore_rl.trainer.tracking import Tracker, console_line
from mcore_rl.trainer.validation import load_val_dataset, sums_size, val_line, validate

# vLLM logs at INFO per call (prefix-cache resets, weight reloads); keep the console to our lines.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # VLLM_LOGGING_LEVEL=INFO shows them again
warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather_into_tensor.*")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights sync by reference

# the phases of a step, in `timing/<phase>`; timing/other is the step's time outside them
PHASES = ("sync", "wake", "generate", "sleep", "reward", "wait_rollout", "shard", "logprob", "advantage", "train")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _say(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


@contextmanager
def _timed(timing: dict, phase: str):
    t = time.perf_counter()
    yield
    timing[f"timing/{phase}"] = timing.get(f"timing/{phase}", 0.0) + time.perf_counter() - t


class NonFiniteError(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient norm (exit code 3)."""


class PPOTrainer:
    """`bridge`: with split placement, this rank's link to the rollout ranks (it only trains)."""

    def __init__(self, cfg: DictConfig, bridge=None):
        self.cfg, self.bridge = cfg, bridge
        a = cfg.actor_rollout_ref
        tp, pp = a.actor.megatron.tensor_model_parallel_size, a.actor.megatron.pipeline_model_parallel_size
        if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available")
        world = bridge.world if bridge is not None else launch_world_size()
        check_sizes(cfg, world)  # before any process group forms
        self.output_dir = cfg.trainer.output_dir or build.default_output_dir(cfg)
        self.checkpoint_root = os.path.join(self.output_dir, "checkpoints")
        damaged: list = []  # (path, why) of checkpoints passed over
        self.resume_from = checkpointing.resolve_resume(cfg.trainer.resume, self.checkpoint_root, damaged)  # early
        in_the_way = checkpointing.check_run_dir(self.output_dir, self.resume_from, cfg.trainer.on_previous_run,
                                                 damaged, resume_auto=str(cfg.trainer.resume) == "auto")
        self.model_path = build.model_path(cfg, self.output_dir)
        self.spec = arch_from_hf_config(self.model_path)
        check_sizes(cfg, world, self.spec)  # TP vs heads, PP vs layers: still before any process group
        # data, reward function, rollout engine, loggers: before any process group, model or engine
        self.tokenizer, self.pad_id, self.dataset, self.loader, self.rewards = load_inputs(
            cfg, self.model_path, self.output_dir)
        self.val_dataset = load_val_dataset(cfg, self.tokenizer)
        if bridge is not None:  # the rollout ranks score
            self.rewards.close()
            self.rewards = None
        torch.manual_seed(cfg.trainer.seed)
        init_distributed(tp, pp, seed=cfg.trainer.seed, timeout_s=cfg.trainer.dist_timeout_s)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self._make_layout(tp, pp)
        _say(f"mcore_rl: output dir {self.output_dir}")
        self._start_lineage(in_the_way, damaged)
        env, engines = read_launch_env(), None
        if bridge is not None:  # the layout is the training ranks'; the rollout engines come after them
            rtp = a.rollout.tensor_model_parallel_size
            engines = tuple(tuple(range(r, r + rtp)) for r in range(bridge.train_world, bridge.world, rtp))
            env = dataclasses.replace(env, world_size=bridge.world)
        if env.local_rank == 0:
            for line in describe_layout(self.layout, env, engines):
                print(line, flush=True)
        self._build()

    # ---------------------------------------------------------------- setup
    def _start_lineage(self, in_the_way: list[str], damaged: list) -> None:
        """Another run's files moved aside (trainer.on_previous_run=move_aside), damaged checkpoints
        named, and this run's id: the resumed checkpoint's, or a new one (collective)."""
        if in_the_way:
            if self.rank == 0:
                dest = checkpointing.move_previous_run(self.output_dir)
                print(f"mcore_rl: moved the previous run's {', '.join(in_the_way)} to {dest}", flush=True)
            dist.barrier()
        for path, why in damaged:
            _say(f"mcore_rl: WARNING: checkpoint {path} is damaged ({why}); passed over for an older one")
        resumed = checkpointing.read_state(self.resume_from).get("run_id") if self.resume_from else None
        self.run_id = resumed or checkpointing.new_run_id()
        _say(f"mcore_rl: run {self.run_id}" + (" (continued)" if resumed else ""))

    def _make_layout(self, tp: int, pp: int) -> None:
        """The one answer to "who does what" (roles, slices, shards), checked against megatron's groups."""
        if self.bridge is not None:  # the training side alone; a (virtual) engine per TP group
            self.layout = split.train_layout(self.cfg, self.world, self.rank)
        else:
            self.layout = rank_layout(self.world, tp, pp, rank=self.rank,
                                      rollout_tp=self.cfg.actor_rollout_ref.rollout.tensor_model_parallel_size)
        group = ps.get_data_parallel_group()
        if tuple(dist.get_process_group_ranks(group)) != self.layout.dp_group(self.rank):
            raise RuntimeError(f"megatron's DP group {dist.get_process_group_ranks(group)} differs from the layout's "
                               f"{self.layout.dp_group(self.rank)}")
        self.dp_group = group  # batch-wide sums go over DP only (TP/PP replicas hold the same shard)

    def _build(self) -> None:
        cfg, a = self.cfg, self.cfg.actor_rollout_ref
        t0 = time.perf_counter()
        m = build.build_models(cfg, self.spec, self.model_path)
        self.actor, self.actor_opt, self.actor_lr = m.actor, m.actor_opt, m.actor_lr
        self.critic, self.critic_opt, self.critic_lr, self.ref = m.critic, m.critic_opt, m.critic_lr, m.ref
        self.use_critic, self.need_ref = self.critic is not None, needs_reference(cfg)
        lora = lora_of(self.actor)
        _say(f"mcore_rl: models ready in {time.perf_counter() - t0:.1f}s "
             f"({self.spec.hf_architecture}, {self.spec.num_params() / 1e6:.2f}M params, "
             f"TP={ps.get_tensor_model_parallel_world_size()} PP={ps.get_pipeline_model_parallel_world_size()} "
             f"DP={ps.get_data_parallel_world_size()}, critic={'yes' if self.use_critic else 'no'}, "
             f"reference={'no' if not self.need_ref else 'the actor without LoRA' if lora else 'yes'})")
        if lora is not None:  # (collective)
            n = trainable_params(self.actor)
            _say(f"mcore_rl: LoRA rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)}: {n:,} trainable "
                 f"parameters ({100 * n / self.spec.num_params():.2f}% of the actor); base weights frozen")

        self.pending = None  # split placement, staleness 1: (samples, rollout report) of the next step
        self._weights_out = None  # split placement: the version of the weights the rollout ranks have
        if self.bridge is not None:
            self.engine = self.resharder = None
            self.sender = split.WeightSender(self.actor, self.bridge, a.rollout.sync_bucket_mb)
            _say(f"mcore_rl: split placement: {self.world} rank(s) train, {self.bridge.world - self.world} generate "
                 f"(async_training.staleness={cfg.async_training.staleness})")
        else:
            self.resharder = Resharder(self.actor, bucket_mb=a.rollout.sync_bucket_mb, fast_path=a.rollout.sync_fast_path,
                                       lora_sync=a.rollout.lora_sync, base_model=self.model_path)
            t0 = time.perf_counter()
            self.engine = build.build_engine(cfg, self.model_path)
            # free_cache_engine: the engine sleeps after generating (`release`: weights and KV cache
            # dropped; with lora_sync=adapter the base weights wait in host memory) and wakes in the
            # next `update_weights`, which rewrites every weight (or the adapters alone)
            _say(f"mcore_rl: rollout engine {type(self.engine).__name__} ready in {time.perf_counter() - t0:.1f}s"
                 f"{' (sleeps during training)' if self.engine.sleep_enabled else ''}")
        bad_rows = getattr(self.dataset, "bad_rows", [])
        for bad in bad_rows[:20]:
            _say(f"mcore_rl: skipped bad data row: {bad}")
        if len(bad_rows) > 20:
            _say(f"mcore_rl: ... and {len(bad_rows) - 20} more bad data rows skipped")
        self.step = 0
        self.bad_steps = 0  # consecutive steps with a skipped (non-finite) update
        self.last_saved_step = None
        for opt in (self.actor_opt, self.critic_opt):
            why = checkpointing.optimizer_state_unloadable(opt) if opt is not None else None
            if why:
                _say(f"mcore_rl: WARNING: {why}")
                break
        self._resume()

    # ---------------------------------------------------------------- checkpoints
    def _resume(self) -> None:
        ckpt = self.resume_from
        if ckpt is None:
            if str(self.cfg.trainer.resume) == "auto":
                _say(f"mcore_rl: no checkpoint under {self.checkpoint_root}: starting at step 0")
            return
        t0 = time.perf_counter()
        if lora_of(self.actor) is not None:  # the adapters go on this run's base: the one they were trained on?
            checkpointing.check_lora_base(ckpt, self.model_path)
        state = checkpointing.load_checkpoint(ckpt, actor=self.actor, actor_opt=self.actor_opt, critic=self.critic,
                                              critic_opt=self.critic_opt, layout=self.layout.checkpoint_key())
        self.loader.load_state_dict(state["loader"])
        self.step = self.last_saved_step = int(state["step"])
        if self.bridge is not None and (state["rank_state"] or {}).get("pending") is not None:
            buf, rows, seq_len, report = state["rank_state"]["pending"]
            self.pending = (Shard.from_bytes(buf, rows, seq_len), report)
        self.bad_steps = int(state.get("bad_steps", 0))
        saved = state.get("layout", {})
        _say(f"mcore_rl: resumed from {ckpt} (step {self.step}, saved at TP={saved.get('tp')} PP={saved.get('pp')} "
             f"DP={saved.get('dp')}; RNG {'restored' if state['rng_restored'] else 'not restored: layout differs'}) "
             f"in {time.perf_counter() - t0:.1f}s")

    def save_checkpoint(self) -> str:
        """Collective: actor, critic, optimizers, RNG, data position -> checkpoints/step_N (atomic)."""
        if not checkpointing.all_finite(self.actor, self.critic):
            raise NonFiniteError(f"step {self.step}: the model has non-finite weights; not checkpointing it "
                                 f"(the last good checkpoint is in {self.checkpoint_root})")
        t0 = time.perf_counter()
        path = checkpointing.save_checkpoint(
            self.checkpoint_root, self.step, actor=self.actor, actor_opt=self.actor_opt, critic=self.critic,
            critic_opt=self.critic_opt, hf_side_dir=self.model_path, keep=self.cfg.trainer.max_ckpt_to_keep,
            trainer_state={"loader": self.loader.state_dict(), "layout": self.layout.checkpoint_key(), "bad_steps": self.bad_steps,
                           "run_id": self.run_id, "config": to_plain(self.cfg)},
            rank_state={"pending": self._pending_state()})
        self.last_saved_step = self.step
        _say(f"mcore_rl: checkpoint {path} saved in {time.perf_counter() - t0:.1f}s")
        return path

    def export_hf(self, out: str | None = None) -> str:
        """The actor as an HF checkpoint (transformers / vLLM), default <output_dir>/hf_model."""
        out = out or os.path.join(self.output_dir, "hf_model")
        t0 = time.perf_counter()
        export_hf(self.actor, self.model_path, out, force=True, progress=False)
        _say(f"mcore_rl: HF export of the actor at step {self.step}: {out} ({time.perf_counter() - t0:.1f}s)")
        return out

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        """One RL step, phase by phase; each phase's seconds go to `timing/<phase>`."""
        timing, t0 = {}, time.perf_counter()
        rows = self.loader.next_batch()
        if self.bridge is None:
            self._sync_weights(timing)                     # actor -> rollout engine
            local = self._rollout(rows, timing)            # this engine's slice, generated and scored
        else:
            local = self._split_rollout(timing)            # weights out, samples in (split placement)
        metrics = self._reward_metrics(local)
        order, shaped = shaping.prompt_order(local, len(rows), self.cfg, self.layout)
        metrics.update(shaped)
        with _timed(timing, "shard"):
            shard = self._shard(local, order)              # this rank's training shard
        del local
        with _timed(timing, "logprob"):
            self._logprobs(shard)                          # old / reference log-probs, values
            metrics.update(self._shard_metrics(shard, shard.mask))
        with _timed(timing, "advantage"):
            self._advantages(shard)
        with _timed(timing, "train"):
            metrics.update(self._update(shard))            # PPO epochs over mini-batches
        if self.bridge is not None and self.cfg.async_training.staleness == 1:
            self.pending = self._receive_batch(timing)     # generated while this step trained
        timing["timing/step"] = time.perf_counter() - t0
        timing["timing/other"] = timing["timing/step"] - sum(timing.get(f"timing/{p}", 0.0) for p in PHASES)
        metrics["perf/tokens_per_s"] = metrics.pop("_tokens") / timing["timing/step"]
        return {**metrics, **timing}

    def _sync_weights(self, timing: dict) -> None:
        """The actor's current weights into the rollout engine, which is then ready to generate."""
        timing.update(self.resharder.sync(self.engine))

    def _rollout(self, rows: list, timing: dict) -> Shard:
        """Generate and score this engine's slice of the step's prompts (every rank of the engine
        holds the result; its first rank scored it)."""
        cfg = self.cfg
        slice_ = self.layout.rollout_slice(len(rows), cfg.actor_rollout_ref.actor.ppo_mini_batch_size)
        sampling = rollouts.step_sampling(cfg, self.step, slice_)
        return rollouts.generate_and_score(
            self.engine, self.rewards, self.tokenizer, self.layout, rows, slice_, sampling, cfg.reward.strict,
            cfg.data.max_prompt_length, cfg.data.max_response_length, self.pad_id, timing)

    # ---------------------------------------------------------------- split placement
    def _send_weights(self, version: int, timing: dict, kind: str = "weights", **header) -> None:
        """The actor's weights after `version` steps to the rollout ranks (collective), unless they
        have them already (sent for a validation): then the header alone."""
        attached = self._weights_out != version
        stats = self.sender.send({"kind": kind, "version": version, "attached": attached, **header}, attached)
        self._weights_out = version
        if attached:
            timing["timing/sync"], timing["sync/bytes"] = stats["sync/seconds"], stats["sync/bytes"]

    def validate_on_rollout_ranks(self) -> list[float]:
        """Split placement: validation's sums for the current weights, which go out now (the next
        batch's message then carries none)."""
        self._send_weights(self.step, {}, kind="validate")
        n = sums_size(self.cfg.actor_rollout_ref.rollout.val_kwargs.n)
        sums = split.recv_val(self.bridge, n) if self.rank == 0 else [0.0] * n
        return comm.all_reduce_scalars(sums)  # to every training rank

    def _receive_batch(self, timing: dict) -> tuple:
        """This rank's slice of the next batch from the rollout engines, and their report."""
        r, t = self.cfg.actor_rollout_ref, time.perf_counter()
        local = split.recv_samples(self.bridge, self.layout, (self.bridge.world - self.world) // r.rollout.tensor_model_parallel_size,
                                   r.rollout.tensor_model_parallel_size, self.cfg.data.train_batch_size,
                                   r.actor.ppo_mini_batch_size, r.rollout.n,
                                   self.cfg.data.max_prompt_length + self.cfg.data.max_response_length)
        report = split.recv_report(self.bridge) if self.rank == 0 else {}
        timing["timing/wait_rollout"] = timing.get("timing/wait_rollout", 0.0) + time.perf_counter() - t
        return local, report

    def _start_split(self) -> None:
        """First message of a run to the rollout ranks: the weights, the data position, and how many
        batches this side already holds (a batch in flight saved with the checkpoint)."""
        self._send_weights(self.step, {}, loader=self.loader.state_dict(), skip=0 if self.pending is None else 1)
        self._first_step = self.step + 1
        if self.cfg.async_training.staleness == 1 and self.pending is None:
            self.pending = self._receive_batch({})

    def _split_rollout(self, timing: dict) -> Shard:
        """Staleness 0: the weights after the last step out, this step's samples in. Staleness 1:
        the samples that arrived during the last step; the weights go out for the batch after next."""
        if self.step > self._first_step:
            self._send_weights(self.step - 1, timing)
        if self.cfg.async_training.staleness == 0:
            local, report = self._receive_batch(timing)
        else:
            (local, report), self.pending = self.pending, None
        if report:  # the rollout side's own times (they overlap this side's with staleness 1)
            timing["rollout/staleness"] = self.step - 1 - report["rollout/weight_version"]  # steps behind
            timing.update({split.REPORT_NAMES[k]: v for k, v in report.items()})
        return local

    def _pending_state(self):
        if self.pending is None:
            return None
        local, report = self.pending
        return (local.to_bytes(), len(local), local.input_ids.shape[1], report)

    def _reward_metrics(self, local: Shard) -> dict:
        return rollouts.reward_metrics(local, self.layout.leads_engine)

    def _shard(self, local: Shard, order: list[int]) -> Shard:
        a = self.cfg.actor_rollout_ref
        return shaping.training_shard(local, order, self.layout, a.actor.ppo_mini_batch_size, a.rollout.n)

    def _logprobs(self, shard: Shard) -> None:
        """Old (actor) and reference log-probs and the critic's values of the shard, in place;
        with `use_dynamic_bsz`, on packed micro-batches of each pass's token budget."""
        cfg, a = self.cfg, self.cfg.actor_rollout_ref
        dyn = a.actor.use_dynamic_bsz
        shard.old_logp = compute_logprobs(self.actor, shard, a.rollout.log_prob_micro_batch_size_per_gpu,
                                          max_tokens=a.rollout.log_prob_max_token_len_per_gpu if dyn else None)[0]
        if self.need_ref:
            with self._reference() as ref:
                shard.ref_logp = compute_logprobs(ref, shard, a.ref.log_prob_micro_batch_size_per_gpu,
                                                  max_tokens=a.ref.log_prob_max_token_len_per_gpu if dyn else None)[0]
        if self.use_critic:
            shard.old_values = compute_values(self.critic, shard, cfg.critic.ppo_micro_batch_size_per_gpu,
                                              max_tokens=cfg.critic.ppo_max_token_len_per_gpu if dyn else None)

    @contextmanager
    def _reference(self):
        """The reference policy: its own frozen model, or with LoRA the actor with adapters off."""
        if self.ref is not None:
            yield self.ref
        else:
            with disabled(self.actor):
                yield self.actor

    def _advantages(self, shard: Shard) -> None:
        """Advantages and returns of the shard, in place: groups are whole on this rank, batch-wide
        whitening uses scalars all-reduced over DP."""
        alg, mask = self.cfg.algorithm, shard.mask
        token_rewards = last_token_rewards(shard.scores, mask)
        if alg.use_kl_in_reward:
            token_rewards, _ = apply_kl_in_reward(token_rewards, shard.old_logp, shard.ref_logp, mask,
                                                  alg.kl_ctrl.kl_coef, alg.kl_penalty)
        shard.advantages, shard.returns = compute_advantages(
            alg.adv_estimator, mask=mask, token_rewards=token_rewards, values=shard.old_values,
            group_index=shard.prompt_index, gamma=alg.gamma, lam=alg.lam,
            norm_by_std=alg.norm_adv_by_std_in_grpo, group=self.dp_group)

    def _update(self, shard: Shard) -> dict:
        """PPO epochs over the shard's mini-batches: critic first, then actor; learning rates from
        the step number (a resumed run continues its schedule)."""
        a = self.cfg.actor_rollout_ref
        metrics = {"actor/lr": self.actor_lr.set_step(self.step)}
        if self.use_critic:
            metrics["critic/lr"] = self.critic_lr.set_step(self.step)
        per = a.actor.ppo_mini_batch_size // self.layout.dp * a.rollout.n  # this rank's rows of a mini-batch
        minis = [range(i, i + per) for i in range(0, len(shard), per)]
        if self.use_critic:
            metrics.update(update_critic(self.critic, self.critic_opt, shard, self.cfg, minis, self.dp_group))
        metrics.update(update_actor(self.actor, self.actor_opt, shard, self.cfg, minis, self.dp_group))
        if not self.need_ref:
            metrics["actor/kl"] = metrics.get("actor/ppo_kl", float("nan"))
        return metrics

    def _shard_metrics(self, shard: Shard, mask: torch.Tensor) -> dict:
        """Batch-wide metrics of the training batch from this shard's sums (all-reduced over DP)."""
        lengths = shard.response_length.float()
        sums = [lengths.sum(), torch.tensor(float(len(shard))), shard.truncated.sum().float(),
                (lengths.sum() + shard.prompt_length.sum()).float()]
        if self.need_ref:
            sums += [((shard.old_logp - shard.ref_logp) * mask).sum(), mask.sum().float()]
        sums = comm.all_reduce(torch.stack(sums), self.dp_group)
        out = {"response/length_mean": float(sums[0] / sums[1]), "response/clip_ratio": float(sums[2]) / float(sums[1]),
               "_tokens": float(sums[3])}
        if self.need_ref:
            out["actor/kl"] = float(sums[4] / sums[5].clamp(min=1))
        if self.cfg.actor_rollout_ref.rollout.calculate_log_probs:  # (else the engine returned none)
            diff = (shard.old_logp - shard.rollout_logprobs).abs()[mask]
            diff_max = comm.all_reduce(diff.max() if diff.numel() else torch.zeros(()), self.dp_group, op="max")
            out["rollout/logprob_diff_max"] = float(diff_max)
        return out

    # ---------------------------------------------------------------- loop
    def fit(self) -> list[dict]:
        """Train to `trainer.max_steps`, checkpointing every `save_freq` steps and at the end
        (`save_at_end`).

        SIGTERM (Slurm's warning before preemption or the time limit) and a first Ctrl-C (SIGINT)
        finish the current step, save a checkpoint and return; `self.stopped_by_signal` is then
        True. A second Ctrl-C raises KeyboardInterrupt at once.
        """
        cfg, t = self.cfg, self.cfg.trainer
        # rank 0 alone owns metrics.jsonl: another rank truncating it on resume would race with it
        tracker = Tracker(self.output_dir, list(t.logger), to_plain(cfg), t.project_name, t.experiment_name,
                          resume_step=self.step, run_id=self.run_id) if self.layout.reports else None
        if self.layout.reports:
            OmegaConf.save(cfg, os.path.join(self.output_dir, "config.yaml"))
        self.stopped_by_signal = self._split_stopped = False
        self._stop_signal, self._first_sigint = None, None
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        t0 = time.perf_counter()
        history = []
        if self.val_dataset is not None and t.val_before_train and self.step == 0:
            self._validate(tracker, history)
        if self.bridge is not None:
            self._start_split()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", disable=not self.layout.reports, leave=False)
        try:
            while self.step < t.max_steps:
                self.step += 1
                with stack_dump_after(t.dist_timeout_s):  # a step that long is waiting somewhere: say where
                    m = self.train_step()
                    if self._validation_due():
                        m.update(self._validate())
                history.append({"step": self.step, **m})
                skipped = m.get("actor/skipped_updates", 0) + m.get("critic/skipped_updates", 0)
                self.bad_steps = self.bad_steps + 1 if skipped else 0
                if self.layout.reports:
                    tracker.log(self.step, m)
                    if self.step % t.log_interval == 0 or self.step == t.max_steps:  # metrics.jsonl: every step
                        bar.write(console_line(self.step, m))
                    bar.update(1)
                if skipped:
                    _say(f"mcore_rl: step {self.step}: non-finite loss or gradient norm (actor loss "
                         f"{m.get('actor/loss', float('nan')):.4g}, grad norm {m.get('actor/grad_norm', float('nan')):.4g}"
                         + (f", critic loss {m['critic/loss']:.4g}" if "critic/loss" in m else "")
                         + f"): {int(skipped)} update(s) skipped, {self.bad_steps} bad step(s) in a row "
                         f"(trainer.max_bad_steps={t.max_bad_steps})")
                    if self.bad_steps >= t.max_bad_steps:
                        raise NonFiniteError(
                            f"stopping: {self.bad_steps} steps in a row with a non-finite loss or gradient norm "
                            f"(trainer.max_bad_steps={t.max_bad_steps}); nothing was checkpointed from them. "
                            f"Last checkpoint: {self.checkpoint_root}. Usual causes: learning rate, a reward "
                            f"that returns inf/NaN, fp16 overflow")
                if t.save_freq > 0 and self.step % t.save_freq == 0 and not skipped:
                    self.save_checkpoint()  # not after a skipped update: the last good one stays newest
                if comm.agree(self._stop_signal is not None):  # ranks see the signal at different times
                    if self.last_saved_step != self.step:
                        self.save_checkpoint()
                    self._stop_split()
                    self.stopped_by_signal = True
                    _say(f"mcore_rl: {self._stop_signal or 'signal'}: stopped after step {self.step} with a checkpoint; "
                         f"rerun with trainer.resume=auto to continue")
                    return history
            if t.save_at_end and self.last_saved_step != self.step:
                self.save_checkpoint()
            self._stop_split()
            if t.export_hf_at_end:
                self.export_hf()
        except NonFiniteError:
            self._stop_split()  # the rollout ranks exit too (the training ranks exit 3)
            raise
        finally:
            bar.close()
            if tracker is not None:
                tracker.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        _say(f"Training completed in {time.perf_counter() - t0:.1f}s ({self.step} steps); metrics: "
             f"{os.path.join(self.output_dir, 'metrics.jsonl')}")
        return history

    def _stop_split(self) -> None:
        """Tell the rollout ranks to finish, once (nothing of theirs is in flight at a step boundary)."""
        if self.bridge is not None and not self._split_stopped:
            self._split_stopped = True
            self.sender.stop()

    def _validation_due(self) -> bool:
        t = self.cfg.trainer
        return (self.val_dataset is not None and t.test_freq > 0
                and (self.step % t.test_freq == 0 or self.step == t.max_steps))

    def _validate(self, tracker=None, history=None) -> dict:
        """Validation metrics at the current step; with `tracker`, logged as a row of their own
        (the initial model, step 0)."""
        m = validate(self)
        _say(val_line(self.step, m))
        if history is not None:
            history.append({"step": self.step, **m})
        if tracker is not None:
            tracker.log(self.step, m)
        return m

    def _on_stop_signal(self, signum, frame) -> None:
        """Stop after this step with a checkpoint. A second Ctrl-C aborts; one within a second of
        the first is the same keypress (torchrun forwards the SIGINT its workers got already)."""
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self._first_sigint is not None and now - self._first_sigint > 1.0:
                raise KeyboardInterrupt
            self._first_sigint = self._first_sigint or now
        if self._stop_signal is None:
            self._stop_signal = signal.Signals(signum).name
            again = " (Ctrl-C again to abort without it)" if signum == signal.SIGINT else ""
            print(f"mcore_rl: rank {self.rank}: {self._stop_signal} received; checkpointing after step "
                  f"{self.step}{again}", flush=True)

    def close(self) -> None:
        if getattr(self, "rewards", None) is not None:
            self.rewards.close()
            self.rewards = None
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None
