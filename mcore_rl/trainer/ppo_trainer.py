"""The RL loop, SPMD and colocated: every rank runs this same code on its own shards.

One step (ARCHITECTURE.md):
  prompts -> reshard actor into the rollout engine -> generate this engine's slice ->
  rewards -> training shard (samples from peer engines of the model-parallel group, if any) ->
  old / reference log-probs, values on the shard -> advantages (groups locally, whitening by
  all-reduced scalars) -> PPO epochs over mini-batches (actor, critic) -> metrics, checkpoint.

Who does what is asked of one `Layout` (`self.layout`, built at start). A rank never holds
the step's whole batch; only scalars cross DP ranks.
"""

from __future__ import annotations

import os
import signal
import time
import warnings

from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from mcore_rl.algorithms import apply_kl_in_reward, compute_advantages, filter_zero_variance_groups, overlong_penalty
from mcore_rl.config import check_sizes, launch_world_size, to_plain
from mcore_rl.distributed import comm
from mcore_rl.rollout.base import Sampling
from mcore_rl.trainer.batch import Sample, Shard, last_token_rewards, pad_batch
from mcore_rl.trainer.inputs import load_inputs
from mcore_rl.trainer.packing import balance_order, dp_imbalance, sequence_lengths
from mcore_rl.trainer.tracking import Tracker, console_line
from mcore_rl.trainer.validation import load_val_dataset
from mcore_rl.trainer.workers import compute_logprobs, compute_values, update_actor, update_critic

# vLLM logs at INFO per call (prefix-cache resets, weight reloads); keep the console to our lines.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # VLLM_LOGGING_LEVEL=INFO shows them again
warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather_into_tensor.*")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights sync by reference
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _say(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


def default_output_dir(cfg: DictConfig) -> str:
    return os.path.join(os.getcwd(), "outputs", cfg.trainer.project_name, cfg.trainer.experiment_name)


class NonFiniteError(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient norm (exit code 3)."""


@dataclass
class _SliceSampling(Sampling):
    """Sampling for a slice of the step's batch: prompt k of the call is prompt `prompts[k]` of
    the batch and gets that prompt's seed, so samples do not depend on who generates them."""

    prompts: tuple[int, ...] = ()

    def request_seed(self, prompt_index: int) -> int | None:
        return None if self.seed is None else self.seed + self.prompts[prompt_index] * self.n


class PPOTrainer:
    def __init__(self, cfg: DictConfig):
        from mcore_rl.distributed import init_distributed

        self.cfg = cfg
        a = cfg.actor_rollout_ref
        tp, pp = a.actor.megatron.tensor_model_parallel_size, a.actor.megatron.pipeline_model_parallel_size
        if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available")
        world = launch_world_size()
        check_sizes(cfg, world)  # before any process group forms
        self.output_dir = cfg.trainer.output_dir or default_output_dir(cfg)
        from mcore_rl.trainer.checkpointing import check_run_dir, resolve_resume

        self.checkpoint_root = os.path.join(self.output_dir, "checkpoints")
        damaged: list = []  # (path, why) of checkpoints passed over
        self.resume_from = resolve_resume(cfg.trainer.resume, self.checkpoint_root, damaged)  # a bad path fails here, early
        in_the_way = check_run_dir(self.output_dir, self.resume_from, cfg.trainer.on_previous_run, damaged,
                                   resume_auto=str(cfg.trainer.resume) == "auto")
        self.model_path = self._model_path()
        from mcore_rl.models.arch import arch_from_hf_config

        self.spec = arch_from_hf_config(self.model_path)
        check_sizes(cfg, world, self.spec)  # TP vs heads, PP vs layers: still before any process group
        # data, reward function, rollout engine, loggers: before any process group, model or engine
        self.tokenizer, self.pad_id, self.dataset, self.loader, self.rewards = load_inputs(
            cfg, self.model_path, self.output_dir)
        self.val_dataset = load_val_dataset(cfg, self.tokenizer)
        torch.manual_seed(cfg.trainer.seed)
        init_distributed(tp, pp, seed=cfg.trainer.seed, timeout_s=cfg.trainer.dist_timeout_s)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self._make_layout(tp, pp)
        _say(f"mcore_rl: output dir {self.output_dir}")
        self._start_lineage(in_the_way, damaged)
        self._describe_layout()
        self._build()

    # ---------------------------------------------------------------- setup
    def _start_lineage(self, in_the_way: list[str], damaged: list) -> None:
        """Another run's files moved aside (trainer.on_previous_run=move_aside), damaged checkpoints
        named, and this run's id: the resumed checkpoint's, or a new one (collective)."""
        from mcore_rl.trainer.checkpointing import move_previous_run, new_run_id, read_state

        if in_the_way:
            if self.rank == 0:
                dest = move_previous_run(self.output_dir)
                print(f"mcore_rl: moved the previous run's {', '.join(in_the_way)} to {dest}", flush=True)
            dist.barrier()
        for path, why in damaged:
            _say(f"mcore_rl: WARNING: checkpoint {path} is damaged ({why}); passed over for an older one")
        resumed = read_state(self.resume_from).get("run_id") if self.resume_from else None
        self.run_id = resumed or new_run_id()
        _say(f"mcore_rl: run {self.run_id}" + (" (continued)" if resumed else ""))

    def _make_layout(self, tp: int, pp: int) -> None:
        """The one answer to "who does what" (roles, slices, shards), checked against megatron's groups."""
        from megatron.core import parallel_state as ps

        from mcore_rl.distributed.layout import rank_layout

        self.layout = rank_layout(self.world, tp, pp, rollout_tp=self.cfg.actor_rollout_ref.rollout.tensor_model_parallel_size,
                                  rank=self.rank)
        group = ps.get_data_parallel_group()
        if tuple(dist.get_process_group_ranks(group)) != self.layout.dp_group(self.rank):
            raise RuntimeError(f"megatron's DP group {dist.get_process_group_ranks(group)} differs from the layout's "
                               f"{self.layout.dp_group(self.rank)}")
        self.dp_group = group  # batch-wide sums go over DP only (TP/PP replicas hold the same shard)

    def _describe_layout(self) -> None:
        try:
            from mcore_rl.distributed.env import read_launch_env
            from mcore_rl.distributed.layout import describe_layout

            env = read_launch_env()
            if env.local_rank == 0:
                for line in describe_layout(self.layout, env):
                    print(line, flush=True)
        except ImportError:
            pass

    def _model_path(self) -> str:
        path = self.cfg.actor_rollout_ref.model.path
        if path:
            return str(path)
        if self.cfg.data.dataset_name != "toy":
            raise ValueError("actor_rollout_ref.model.path is required (only the toy dataset builds its own model)")
        from mcore_rl.toy import build_toy_model

        # Built before any process group exists: the first local rank of each node writes it
        # (deterministic in the seed) to a temp dir renamed into place; the others wait for it.
        path = os.path.join(self.output_dir, "toy_model")
        os.makedirs(self.output_dir, exist_ok=True)
        if int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0 and not os.path.isdir(path):
            tmp = f"{path}.tmp-{os.getpid()}"
            build_toy_model(tmp, seed=self.cfg.trainer.seed)
            os.replace(tmp, path)
        deadline = time.time() + 600
        while not os.path.isdir(path):
            if time.time() > deadline:
                raise TimeoutError(f"waited 600 s for the toy model at {path}")
            time.sleep(0.2)
        return path

    def _build(self) -> None:
        from converters.hf_io import load_hf_into_model
        from mcore_rl.models.build import build_model
        from mcore_rl.models.optim import LRSchedule, wrap_for_training
        from mcore_rl.resharding import Resharder
        from megatron.core import parallel_state as ps

        cfg, a = self.cfg, self.cfg.actor_rollout_ref
        dtype = DTYPES[a.model.dtype]
        impl = a.model.transformer_impl

        def model(role, optim=None):
            m = build_model(self.spec, role=role, dtype=dtype, transformer_impl=impl)
            load_hf_into_model(m, self.spec, self.model_path)
            if optim is None:
                return m, None
            return wrap_for_training(m, lr=optim.lr, weight_decay=optim.weight_decay, clip_grad=optim.clip_grad,
                                     betas=tuple(optim.betas), use_distributed_optimizer=a.actor.use_distributed_optimizer,
                                     min_lr=optim.min_lr)

        t0 = time.perf_counter()
        self.actor, self.actor_opt = model("actor", a.actor.optim)
        self.use_critic = cfg.algorithm.adv_estimator == "gae"
        self.critic, self.critic_opt = model("critic", cfg.critic.optim) if self.use_critic else (None, None)
        self.need_ref = a.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward
        self.ref = model("reference")[0] if self.need_ref else None
        self.actor_lr = LRSchedule(self.actor_opt, a.actor.optim, cfg.trainer.max_steps)
        self.critic_lr = LRSchedule(self.critic_opt, cfg.critic.optim, cfg.trainer.max_steps) if self.use_critic else None
        _say(f"mcore_rl: models ready in {time.perf_counter() - t0:.1f}s "
             f"({self.spec.hf_architecture}, {self.spec.num_params() / 1e6:.2f}M params, "
             f"TP={ps.get_tensor_model_parallel_world_size()} PP={ps.get_pipeline_model_parallel_world_size()} "
             f"DP={ps.get_data_parallel_world_size()}, critic={'yes' if self.use_critic else 'no'}, "
             f"reference={'yes' if self.need_ref else 'no'})")

        self.resharder = Resharder(self.actor, bucket_mb=a.rollout.sync_bucket_mb)
        self.engine = self._make_engine(dtype)
        bad_rows = getattr(self.dataset, "bad_rows", [])
        for bad in bad_rows[:20]:
            _say(f"mcore_rl: skipped bad data row: {bad}")
        if len(bad_rows) > 20:
            _say(f"mcore_rl: ... and {len(bad_rows) - 20} more bad data rows skipped")
        self.step = 0
        self.bad_steps = 0  # consecutive steps with a skipped (non-finite) update
        self.last_saved_step = None
        from mcore_rl.trainer.checkpointing import optimizer_state_unloadable

        for opt in (self.actor_opt, self.critic_opt):
            why = optimizer_state_unloadable(opt) if opt is not None else None
            if why:
                _say(f"mcore_rl: WARNING: {why}")
                break
        self._resume()

    # ---------------------------------------------------------------- checkpoints
    def _resume(self) -> None:
        from mcore_rl.trainer.checkpointing import load_checkpoint

        ckpt = self.resume_from
        if ckpt is None:
            if str(self.cfg.trainer.resume) == "auto":
                _say(f"mcore_rl: no checkpoint under {self.checkpoint_root}: starting at step 0")
            return
        t0 = time.perf_counter()
        state = load_checkpoint(ckpt, actor=self.actor, actor_opt=self.actor_opt, critic=self.critic,
                                critic_opt=self.critic_opt, layout=self.layout.checkpoint_key())
        self.loader.load_state_dict(state["loader"])
        self.step = self.last_saved_step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        saved = state.get("layout", {})
        _say(f"mcore_rl: resumed from {ckpt} (step {self.step}, saved at TP={saved.get('tp')} PP={saved.get('pp')} "
             f"DP={saved.get('dp')}; RNG {'restored' if state['rng_restored'] else 'not restored: layout differs'}) "
             f"in {time.perf_counter() - t0:.1f}s")

    def save_checkpoint(self) -> str:
        """Collective: actor, critic, optimizers, RNG, data position -> checkpoints/step_N (atomic)."""
        from mcore_rl.trainer.checkpointing import all_finite, save_checkpoint

        if not all_finite(self.actor, self.critic):
            raise NonFiniteError(f"step {self.step}: the model has non-finite weights; not checkpointing it "
                                 f"(the last good checkpoint is in {self.checkpoint_root})")
        t0 = time.perf_counter()
        path = save_checkpoint(
            self.checkpoint_root, self.step, actor=self.actor, actor_opt=self.actor_opt, critic=self.critic,
            critic_opt=self.critic_opt, hf_side_dir=self.model_path, keep=self.cfg.trainer.max_ckpt_to_keep,
            trainer_state={"loader": self.loader.state_dict(), "layout": self.layout.checkpoint_key(), "bad_steps": self.bad_steps,
                           "run_id": self.run_id, "config": to_plain(self.cfg)})
        self.last_saved_step = self.step
        _say(f"mcore_rl: checkpoint {path} saved in {time.perf_counter() - t0:.1f}s")
        return path

    def export_hf(self, out: str | None = None) -> str:
        """The actor as an HF checkpoint (transformers / vLLM), default <output_dir>/hf_model."""
        from converters.checkpoint import export_hf

        out = out or os.path.join(self.output_dir, "hf_model")
        t0 = time.perf_counter()
        export_hf(self.actor, self.model_path, out, force=True, progress=False)
        _say(f"mcore_rl: HF export of the actor at step {self.step}: {out} ({time.perf_counter() - t0:.1f}s)")
        return out

    def _make_engine(self, dtype):
        from mcore_rl.rollout import make_engine

        r = self.cfg.actor_rollout_ref.rollout
        t0 = time.perf_counter()
        engine = make_engine(
            r.name, model_path=self.model_path, tensor_parallel_size=r.tensor_model_parallel_size,
            dtype=self.cfg.actor_rollout_ref.model.dtype, seed=self.cfg.trainer.seed,
            gpu_memory_utilization=r.gpu_memory_utilization,
            max_model_len=self.cfg.data.max_prompt_length + self.cfg.data.max_response_length,
            enforce_eager=r.enforce_eager, kv_cache_gib_cpu=r.kv_cache_gib_cpu, kv_cache_gib=r.kv_cache_gib,
            enable_sleep_mode=bool(r.free_cache_engine), logprobs_mode=r.logprobs_mode.removesuffix("_logprobs"))
        # free_cache_engine: the engine sleeps after generating (`release`) and wakes in the next
        # `update_weights`, where it can sleep (`sleep_enabled`)
        self.resharder.set_fast_path(r.sync_fast_path)
        _say(f"mcore_rl: rollout engine {type(engine).__name__} ready in {time.perf_counter() - t0:.1f}s"
             f"{' (sleeps during training)' if engine.sleep_enabled else ''}")
        return engine

    # ---------------------------------------------------------------- one step
    def _rollout(self, rows: list, timing: dict) -> Shard:
        """Generate and score this engine's slice of the step's prompts (every rank of the
        engine does, and holds the result)."""
        r = self.cfg.actor_rollout_ref.rollout
        slice_ = self.layout.rollout_slice(len(rows), self.cfg.actor_rollout_ref.actor.ppo_mini_batch_size)
        mine = [rows[j] for j in slice_]
        t = time.perf_counter()
        sampling = _SliceSampling(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                  max_tokens=self.cfg.data.max_response_length,
                                  seed=self.cfg.trainer.seed * 1_000_003 + self.step * 100_003, prompts=tuple(slice_))
        outs = self.engine.generate([row.input_ids for row in mine], sampling) if mine else []
        timing["timing/generate"] = time.perf_counter() - t
        timing.update(self.engine.release())
        t = time.perf_counter()
        texts = self.tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
        scores, errors = self.rewards.score([mine[o.prompt_index].prompt for o in outs], texts,
                                            [mine[o.prompt_index].ground_truth for o in outs], strict=self.cfg.reward.strict)
        err_at = {e.index: str(e) for e in errors}
        if self.rewards.timeout_s and self.world > 1:
            self._agree_on_reward_failures([slice_[o.prompt_index] * r.n + o.sample_index for o in outs],
                                           len(rows) * r.n, scores, err_at)
        samples = []
        for i, (o, s) in enumerate(zip(outs, scores)):
            row = mine[o.prompt_index]
            samples.append(Sample(slice_[o.prompt_index], o.sample_index, list(row.input_ids), list(o.token_ids),
                                  list(o.logprobs), o.finish_reason, float(s),
                                  f"{row.where}: {err_at[i]}" if i in err_at else None))
        if self.layout.leads_engine:
            unscored = [e for e in errors if e.error.startswith("not scored:")]
            for s in sorted(samples, key=lambda s: (s.prompt_index, s.sample_index)):
                if s.reward_error and "not scored:" not in s.reward_error:
                    print(f"mcore_rl: reward error (prompt {s.prompt_index}, sample {s.sample_index}): "
                          f"{s.reward_error}", flush=True)
            if unscored:  # after a reward timeout: one line for the rest of the batch
                print(f"mcore_rl: reward error: {len(unscored)} more samples {unscored[0].error}", flush=True)
        timing["timing/reward"] = time.perf_counter() - t
        return pad_batch(samples, self.cfg.data.max_prompt_length, self.cfg.data.max_response_length, self.pad_id)

    def _agree_on_reward_failures(self, where: list[int], total: int, scores: list, err_at: dict) -> None:
        """A reward deadline can fall at different samples on ranks that score the same ones (an
        engine's ranks): a sample that failed on any rank fails on all (one all-reduce of flags
        over the step's samples, `where` their global indices), so they train on equal scores."""
        flags = torch.zeros(total)
        flags[[g for i, g in enumerate(where) if i in err_at]] = 1.0
        flags = comm.all_reduce(flags, op="max")
        for i, g in enumerate(where):
            if flags[g] and i not in err_at:
                scores[i] = 0.0
                err_at[i] = "reward failed on another rank scoring this sample (reward.timeout_s)"

    def _reward_metrics(self, local: Shard) -> dict:
        """Mean / max / min score over every sample of the step (each engine counted once)."""
        lead = self.layout.leads_engine and len(local) > 0
        s = local.scores
        total, count = comm.all_reduce(torch.stack([s.sum(), torch.tensor(float(len(s)))]) if lead
                                       else torch.zeros(2))
        hi, neg_lo = comm.all_reduce(torch.stack([s.max(), -s.min()]) if lead else torch.full((2,), -float("inf")),
                                     op="max")
        return {"reward/mean": float(total / count), "reward/max": float(hi), "reward/min": float(-neg_lo)}

    def _dynamic_sampling(self, local: Shard, batch_size: int) -> tuple[list[int], float]:
        """DAPO: keep the prompts whose samples' scores differ, then whole mini-batches of them.
        Engines decide for their own prompts; one all-reduce of per-prompt flags agrees."""
        keep = filter_zero_variance_groups(local.scores, local.prompt_index)
        flags = torch.zeros(batch_size)
        if self.layout.leads_engine:
            flags[local.prompt_index[keep]] = 1.0
        kept = comm.all_reduce(flags).nonzero().squeeze(1).tolist()
        return self._trim(kept), len(kept) / batch_size

    def _balance(self, local: Shard, order: list[int], batch_size: int) -> tuple[list[int], float]:
        """`order` with each mini-batch's prompts dealt over DP ranks by tokens (packing.balance_order),
        and the DP imbalance left; engines count their own prompts' tokens, one all-reduce agrees."""
        tokens = torch.zeros(batch_size)
        if self.layout.leads_engine and len(local):
            tokens.index_add_(0, local.prompt_index, sequence_lengths(local).float())
        tokens = comm.all_reduce(tokens).tolist()
        mini = self.cfg.actor_rollout_ref.actor.ppo_mini_batch_size
        order = balance_order(order, tokens, mini, self.layout.dp)
        return order, dp_imbalance(order, tokens, mini, self.layout.dp)

    def _shard(self, local: Shard, order: list[int]) -> Shard:
        """This rank's training shard: its prompts of `order`, from its own engine's samples
        and those its peers send (the layout's plan; nothing moves when the shard is local)."""
        mini, n = self.cfg.actor_rollout_ref.actor.ppo_mini_batch_size, self.cfg.actor_rollout_ref.rollout.n
        seq_len = local.input_ids.shape[1]
        recv, send = self.layout.shard_plan(order, mini)
        got = comm.exchange({dst: local.take_prompts(ps).to_bytes() for dst, ps in send.items()},
                            {src: Shard.wire_bytes(len(ps) * n, seq_len) for src, ps in recv.items()})
        parts = [local] + [Shard.from_bytes(got[src], len(ps) * n, seq_len) for src, ps in recv.items()]
        shard = Shard.cat(parts).take_prompts(self.layout.train_shard(order, mini))
        if len(shard) != len(order) * n // self.layout.dp:
            raise RuntimeError(f"rank {self.rank}: training shard has {len(shard)} samples, expected "
                               f"{len(order) * n // self.layout.dp}")
        return shard

    def _sync_weights(self, timing: dict) -> None:
        """The actor's current weights into the rollout engine, which is then ready to generate."""
        timing.update(self.resharder.sync(self.engine))

    def train_step(self) -> dict:
        cfg, a = self.cfg, self.cfg.actor_rollout_ref
        timing, t_step = {}, time.perf_counter()
        rows = self.loader.next_batch()
        self._sync_weights(timing)
        local = self._rollout(rows, timing)
        metrics: dict = self._reward_metrics(local)
        if cfg.algorithm.overlong_buffer.enable:
            local.scores = local.scores + overlong_penalty(
                local.response_length.float(), cfg.data.max_response_length, cfg.algorithm.overlong_buffer.len,
                cfg.algorithm.overlong_buffer.penalty_factor)
        order = list(range(len(rows)))
        if cfg.algorithm.filter_groups.enable:
            order, metrics["filter/kept_fraction"] = self._dynamic_sampling(local, len(rows))
        if a.actor.use_dynamic_bsz and self.layout.dp > 1:
            order, metrics["perf/dp_token_imbalance"] = self._balance(local, order, len(rows))
        t = time.perf_counter()
        shard = self._shard(local, order)
        del local
        timing["timing/shard"] = time.perf_counter() - t
        mask = shard.mask

        t = time.perf_counter()
        dyn = a.actor.use_dynamic_bsz  # token budgets instead of row counts
        shard.old_logp = compute_logprobs(self.actor, shard, a.rollout.log_prob_micro_batch_size_per_gpu,
                                          max_tokens=a.rollout.log_prob_max_token_len_per_gpu if dyn else None)[0]
        if self.need_ref:
            shard.ref_logp = compute_logprobs(self.ref, shard, a.ref.log_prob_micro_batch_size_per_gpu,
                                              max_tokens=a.ref.log_prob_max_token_len_per_gpu if dyn else None)[0]
        if self.use_critic:
            shard.old_values = compute_values(self.critic, shard, cfg.critic.ppo_micro_batch_size_per_gpu,
                                              max_tokens=cfg.critic.ppo_max_token_len_per_gpu if dyn else None)
        metrics.update(self._shard_metrics(shard, mask))
        timing["timing/logprob"] = time.perf_counter() - t

        t = time.perf_counter()
        token_rewards = last_token_rewards(shard.scores, mask)
        if cfg.algorithm.use_kl_in_reward:
            token_rewards, _ = apply_kl_in_reward(token_rewards, shard.old_logp, shard.ref_logp, mask,
                                                  cfg.algorithm.kl_ctrl.kl_coef, cfg.algorithm.kl_penalty)
        shard.advantages, shard.returns = compute_advantages(
            cfg.algorithm.adv_estimator, mask=mask, token_rewards=token_rewards, values=shard.old_values,
            group_index=shard.prompt_index, gamma=cfg.algorithm.gamma, lam=cfg.algorithm.lam,
            norm_by_std=cfg.algorithm.norm_adv_by_std_in_grpo, group=self.dp_group)
        timing["timing/advantage"] = time.perf_counter() - t

        t = time.perf_counter()
        metrics["actor/lr"] = self.actor_lr.set_step(self.step)  # from the step number: a resume continues it
        if self.use_critic:
            metrics["critic/lr"] = self.critic_lr.set_step(self.step)
        per = a.actor.ppo_mini_batch_size // self.layout.dp * a.rollout.n  # this rank's rows of a mini-batch
        minis = [range(i, i + per) for i in range(0, len(shard), per)]
        if self.use_critic:
            metrics.update(update_critic(self.critic, self.critic_opt, shard, cfg, minis, self.dp_group))
        metrics.update(update_actor(self.actor, self.actor_opt, shard, cfg, minis, self.dp_group))
        if not self.need_ref:
            metrics["actor/kl"] = metrics.get("actor/ppo_kl", float("nan"))
        timing["timing/train"] = time.perf_counter() - t
        timing["timing/step"] = time.perf_counter() - t_step
        accounted = sum(timing.get(k, 0.0) for k in ("timing/sync", "timing/wake", "timing/generate", "timing/sleep",
                                                     "timing/reward", "timing/shard", "timing/logprob",
                                                     "timing/advantage", "timing/train"))
        timing["timing/other"] = timing["timing/step"] - accounted
        metrics["perf/tokens_per_s"] = metrics.pop("_tokens") / timing["timing/step"]
        metrics.update(timing)
        return metrics

    def _shard_metrics(self, shard: Shard, mask: torch.Tensor) -> dict:
        """Batch-wide metrics of the training batch from this shard's sums (all-reduced over DP)."""
        lengths = shard.response_length.float()
        sums = [lengths.sum(), torch.tensor(float(len(shard))), shard.truncated.sum().float(),
                (lengths.sum() + shard.prompt_length.sum()).float()]
        if self.need_ref:
            sums += [((shard.old_logp - shard.ref_logp) * mask).sum(), mask.sum().float()]
        sums = comm.all_reduce(torch.stack(sums), self.dp_group)
        diff = (shard.old_logp - shard.rollout_logprobs).abs()[mask]
        diff_max = comm.all_reduce(diff.max() if diff.numel() else torch.zeros(()), self.dp_group, op="max")
        out = {"response/length_mean": float(sums[0] / sums[1]), "response/clip_ratio": float(sums[2]) / float(sums[1]),
               "_tokens": float(sums[3])}
        if self.need_ref:
            out["actor/kl"] = float(sums[4] / sums[5].clamp(min=1))
        out["rollout/logprob_diff_max"] = float(diff_max)
        return out

    def _trim(self, kept: list[int]) -> list[int]:
        """After dynamic sampling, keep whole mini-batches of prompts (sizes must stay divisible)."""
        unit = self.cfg.actor_rollout_ref.actor.ppo_mini_batch_size
        keep = (len(kept) // unit) * unit
        if keep == 0:
            raise RuntimeError("dynamic sampling dropped every group this step (all rewards equal per prompt)")
        return kept[:keep]

    # ---------------------------------------------------------------- loop
    def fit(self) -> list[dict]:
        """Train to `trainer.max_steps`, checkpointing every `save_freq` steps and at the end.

        SIGTERM (Slurm's warning before preemption or the time limit) and a first Ctrl-C (SIGINT)
        finish the current step, save a checkpoint and return; `self.stopped_by_signal` is then
        True. A second Ctrl-C raises KeyboardInterrupt at once.
        """
        from tqdm import tqdm

        from mcore_rl.distributed.watchdog import stack_dump_after

        cfg, t = self.cfg, self.cfg.trainer
        # rank 0 alone owns metrics.jsonl: another rank truncating it on resume would race with it
        tracker = Tracker(self.output_dir, list(t.logger), to_plain(cfg), t.project_name, t.experiment_name,
                          resume_step=self.step, run_id=self.run_id) if self.layout.reports else None
        if self.layout.reports:
            OmegaConf.save(cfg, os.path.join(self.output_dir, "config.yaml"))
        self.stopped_by_signal = False
        self._stop_signal, self._first_sigint = None, None
        previous = {}
        if _in_main_thread():
            from mcore_rl.trainer.checkpointing import start_writer_helper

            start_writer_helper()
            previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        t0 = time.perf_counter()
        history = []
        if self.val_dataset is not None and t.val_before_train and self.step == 0:
            self._validate(tracker, history)
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
                    self.stopped_by_signal = True
                    _say(f"mcore_rl: {self._stop_signal or 'signal'}: stopped after step {self.step} with a checkpoint; "
                         f"rerun with trainer.resume=auto to continue")
                    return history
            if self.last_saved_step != self.step:
                self.save_checkpoint()
            if t.export_hf_at_end:
                self.export_hf()
        finally:
            bar.close()
            if tracker is not None:
                tracker.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        _say(f"Training completed in {time.perf_counter() - t0:.1f}s ({self.step} steps); metrics: "
             f"{os.path.join(self.output_dir, 'metrics.jsonl')}")
        return history

    def _validation_due(self) -> bool:
        t = self.cfg.trainer
        return (self.val_dataset is not None and t.test_freq > 0
                and (self.step % t.test_freq == 0 or self.step == t.max_steps))

    def _validate(self, tracker=None, history=None) -> dict:
        """Validation metrics at the current step; with `tracker`, logged as a row of their own
        (the initial model, step 0)."""
        from mcore_rl.trainer.validation import val_line, validate

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
