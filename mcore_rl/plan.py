"""`mcore-rl plan`: a dry run that says, before a job is queued, how ranks will be laid out
and whether actor, critic, reference and the vLLM engine fit in each GPU's memory.

    mcore-rl plan actor_rollout_ref.model.path=/models/Qwen2.5-7B \\
        actor_rollout_ref.actor.megatron.tensor_model_parallel_size=4 \\
        --nodes 2 --gpus-per-node 8 [--gpu-mem-gib 80] [--json]

Only the model's config.json is read (no weights, no GPU, no torch). Overrides are verl-style
`key=value` pairs parsed with omegaconf; missing keys take the defaults in `DEFAULTS`.
All numbers are estimates; the formulas and their assumptions are in `estimate_memory`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

from mcore_rl.distributed.env import LaunchEnv
from mcore_rl.distributed.layout import describe_layout, rank_layout

__all__ = ["ModelShape", "ParamCounts", "PlanInputs", "MemoryEstimate", "model_shape_from_hf", "count_params",
           "params_per_gpu", "estimate_memory", "plan_inputs_from_config", "DEFAULTS", "main"]

GiB = 1024**3

# verl-style keys this command reads, with the value used when the key is absent.
# None means "derived" (see plan_inputs_from_config).
DEFAULTS: dict[str, object] = {
    "actor_rollout_ref.model.path": None,
    "actor_rollout_ref.model.dtype": "bf16",
    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size": 1,
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size": 1,
    "actor_rollout_ref.actor.megatron.context_parallel_size": 1,
    "actor_rollout_ref.actor.use_distributed_optimizer": True,
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 1,
    "actor_rollout_ref.actor.use_kl_loss": False,
    "actor_rollout_ref.actor.megatron.param_offload": False,
    "actor_rollout_ref.actor.megatron.grad_offload": False,
    "actor_rollout_ref.actor.megatron.optimizer_offload": False,
    "actor_rollout_ref.ref.megatron.param_offload": False,
    "actor_rollout_ref.rollout.tensor_model_parallel_size": None,  # = actor TP
    "actor_rollout_ref.rollout.gpu_memory_utilization": 0.5,
    "actor_rollout_ref.rollout.n": 1,
    "algorithm.adv_estimator": "gae",
    "algorithm.use_kl_in_reward": False,
    "critic.megatron.tensor_model_parallel_size": None,  # = actor TP
    "critic.megatron.pipeline_model_parallel_size": None,  # = actor PP
    "critic.megatron.param_offload": False,
    "critic.megatron.grad_offload": False,
    "critic.megatron.optimizer_offload": False,
    "critic.ppo_micro_batch_size_per_gpu": None,  # = actor's
    "data.train_batch_size": 1024,
    "data.max_prompt_length": 512,
    "data.max_response_length": 512,
    "trainer.nnodes": 1,
    "trainer.n_gpus_per_node": 8,
}

# Constants of the estimate (see estimate_memory).
VOCAB_DIVISIBLE_BY = 128  # megatron's make_vocab_size_divisible_by; padded to a multiple of this * TP
ACT_BYTES_PER_SBH = 34  # Korthikanti et al. 2022, 16-bit activations per (token x hidden) per layer
FIXED_OVERHEAD_GIB = 1.5  # CUDA context, NCCL buffers, allocator slack, per GPU, always present
VLLM_NON_KV_GIB = 1.5  # vLLM's profiled activation peak + CUDA graphs, inside its budget


# ---------------------------------------------------------------------------------------
# model shape and parameter count
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    arch: str  # "llama" family (llama, qwen2, qwen3, mistral) or "opt"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    embed_dim: int = 0  # OPT word_embed_proj_dim; 0 = hidden
    max_positions: int = 0  # OPT learned positions (+2 offset rows)
    final_norm: bool = True

    @property
    def e(self) -> int:
        return self.embed_dim or self.hidden


_LLAMA_LIKE = {"llama", "qwen2", "qwen3", "mistral"}


def model_shape_from_hf(cfg: dict) -> ModelShape:
    """Shape of a HF causal LM from its config.json dict (Llama/Qwen2/Qwen3/Mistral/OPT)."""
    mt = str(cfg.get("model_type", "")).lower()
    if mt == "opt":
        h = int(cfg["hidden_size"])
        bias = bool(cfg.get("enable_bias", True))
        return ModelShape(
            arch="opt", hidden=h, layers=int(cfg["num_hidden_layers"]), heads=int(cfg["num_attention_heads"]),
            kv_heads=int(cfg["num_attention_heads"]), head_dim=h // int(cfg["num_attention_heads"]),
            ffn=int(cfg["ffn_dim"]), vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", True)),
            qkv_bias=bias, o_bias=bias, mlp_bias=bias, embed_dim=int(cfg.get("word_embed_proj_dim") or h),
            max_positions=int(cfg.get("max_position_embeddings", 2048)),
            final_norm=bool(cfg.get("do_layer_norm_before", True)) and not cfg.get("_remove_final_layer_norm", False),
        )
    if mt not in _LLAMA_LIKE:
        raise ValueError(f"model_type {mt!r} is not supported by the planner (supported: {sorted(_LLAMA_LIKE | {'opt'})})")
    h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    attn_bias = bool(cfg.get("attention_bias", False))
    return ModelShape(
        arch=mt, hidden=h, layers=int(cfg["num_hidden_layers"]), heads=nh,
        kv_heads=int(cfg.get("num_key_value_heads") or nh),
        head_dim=int(cfg.get("head_dim") or h // nh), ffn=int(cfg["intermediate_size"]),
        vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=(mt == "qwen2") or attn_bias,
        o_bias=attn_bias and mt in ("llama", "qwen3"),
        mlp_bias=bool(cfg.get("mlp_bias", False)) and mt == "llama",
        qk_norm=(mt == "qwen3"),
    )


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by where megatron puts them. *_sharded are split over TP; the rest is
    replicated in every TP rank (norms, row-parallel biases, learned positions)."""

    embedding: int  # vocab x embed_dim, unpadded
    first_extra: int  # replicated, first stage only (OPT positions, project_in)
    layer_sharded: int
    layer_replicated: int
    last_extra: int  # replicated, last stage only (final norm, OPT project_out)
    lm_head: int  # 0 when tied to the embedding
    layers: int

    @property
    def total(self) -> int:
        """What HF reports (tied weights counted once)."""
        return (self.embedding + self.first_extra + self.layers * (self.layer_sharded + self.layer_replicated)
                + self.last_extra + self.lm_head)


def count_params(s: ModelShape) -> ParamCounts:
    """Exact parameter count of the HF model, split by how megatron shards it."""
    h, e = s.hidden, s.e
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if s.arch == "opt":
        sharded = (3 * h * h + (3 * h if s.qkv_bias else 0)  # q,k,v (column parallel)
                   + h * h  # out_proj (row parallel)
                   + h * s.ffn + (s.ffn if s.mlp_bias else 0)  # fc1 (column parallel)
                   + s.ffn * h)  # fc2 (row parallel)
        replicated = (h if s.o_bias else 0) + (h if s.mlp_bias else 0) + 2 * 2 * h  # row biases, 2 LayerNorms
        first_extra = (s.max_positions + 2) * h + (e * h if e != h else 0)
        last_extra = (2 * h if s.final_norm else 0) + (h * e if e != h else 0)
    else:
        sharded = (h * (q + 2 * kv) + ((q + 2 * kv) if s.qkv_bias else 0)  # q,k,v
                   + q * h  # o_proj
                   + 3 * h * s.ffn + (2 * s.ffn if s.mlp_bias else 0))  # gate, up, down
        replicated = 2 * h + (h if s.o_bias else 0) + (h if s.mlp_bias else 0) + (2 * s.head_dim if s.qk_norm else 0)
        first_extra = 0
        last_extra = h if s.final_norm else 0
    return ParamCounts(
        embedding=s.vocab * e, first_extra=first_extra, layer_sharded=sharded, layer_replicated=replicated,
        last_extra=last_extra, lm_head=0 if s.tied else s.vocab * e, layers=s.layers,
    )


def padded_vocab(vocab: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of 128 * TP."""
    m = VOCAB_DIVISIBLE_BY * tp
    return -(-vocab // m) * m


def params_per_gpu(pc: ParamCounts, s: ModelShape, tp: int, pp: int, value_head: bool = False) -> int:
    """Parameters held by one GPU of the most loaded pipeline stage (first or last).

    Layers are split ceil(L/pp) per stage; the (padded) embedding sits on the first stage and
    the output layer on the last (tied embeddings: the last stage keeps its own copy when
    pp > 1, as megatron does). A critic's output layer is a value head of `hidden` params.
    """
    vp = padded_vocab(s.vocab, tp)
    per_layer = pc.layer_sharded / tp + pc.layer_replicated
    stage_layers = math.ceil(pc.layers / pp)
    emb = vp * s.e / tp
    out = s.hidden if value_head else (vp * s.e / tp)
    needs_out = value_head or not s.tied or pp > 1
    if pp == 1:
        return round(stage_layers * per_layer + emb + pc.first_extra + pc.last_extra + (out if needs_out else 0))
    first = stage_layers * per_layer + emb + pc.first_extra
    last = stage_layers * per_layer + pc.last_extra + out
    return round(max(first, last))


# ---------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------

@dataclass
class PlanInputs:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float = 80.0
    dtype_bytes: int = 2
    tp: int = 1
    pp: int = 1
    cp: int = 1
    rollout_tp: int = 1
    gpu_memory_utilization: float = 0.5
    rollout_n: int = 1
    distributed_optimizer: bool = True
    micro_batch: int = 1
    max_prompt_length: int = 512
    max_response_length: int = 512
    train_batch_size: int = 1024
    critic: bool = True
    critic_tp: int = 1
    critic_pp: int = 1
    critic_micro_batch: int = 1
    ref: bool = False
    actor_offload: tuple[bool, bool, bool] = (False, False, False)  # params, grads, optimizer
    critic_offload: tuple[bool, bool, bool] = (False, False, False)
    ref_param_offload: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class ModelMemory:
    params: int  # per GPU
    weights: float  # bytes per GPU
    grads: float
    optimizer: float
    activations: float
    resident_in_rollout: float  # what stays on GPU while vLLM generates

    @property
    def train_total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class MemoryEstimate:
    total_params: int
    gpu_bytes: float
    actor: ModelMemory
    critic: ModelMemory | None
    ref: ModelMemory | None
    vllm_budget: float
    vllm_weights: float
    vllm_other: float
    vllm_kv: float
    kv_bytes_per_token: float
    kv_tokens: int
    seq_len: int
    seqs_per_engine: int
    overhead: float
    phases: dict[str, float] = field(default_factory=dict)
    peak: float = 0.0
    fits: bool = False
    problems: list[str] = field(default_factory=list)


def estimate_memory(shape: ModelShape, p: PlanInputs) -> MemoryEstimate:
    """Per-GPU memory, in bytes, of one colocated PPO/GRPO rank. Formulas (b = dtype bytes,
    P = parameters on this GPU from `params_per_gpu`, L = layers, h = hidden size):

    weights     P * b                          (bf16/fp16: 2, fp32: 4)
    grads       P * 4                          megatron's main-grad buffer is fp32 for 16-bit
                                               training; it is not sharded by the distributed
                                               optimizer (reduce-scatter into it)
    optimizer   P * (8 + 4 if b < 4 else 8)    Adam exp_avg + exp_avg_sq fp32 (8) + fp32 master
                / (dp * cp) with the           copy of 16-bit params (4); the distributed optimizer
                distributed optimizer          shards it over the data-parallel(+context) group
    activations per layer and micro-batch: 34 * s * mb * h / tp bytes (Korthikanti et al.
                2022, flash attention so no s^2 term, sequence parallel so all of it is split
                by TP, no recompute), s = max_prompt + max_response (padded worst case);
                the first pipeline stage holds pp micro-batches of ceil(L/pp) layers (1F1B),
                the last stage one micro-batch plus fp32 logits and their gradient,
                2 * 4 * s * mb * vocab_padded / tp; activations = max of the two stages.
                The critic's value head has no vocab-sized logits.
    ref         weights only (no grads/optimizer/backward), present when a KL term is used.
    vLLM        its budget is gpu_memory_utilization * GPU memory; inside it: weights
                (all params * b / rollout_tp), VLLM_NON_KV_GIB for profiled activations and
                CUDA graphs, and the rest is KV cache. KV per token per GPU =
                2 (K,V) * L * ceil(kv_heads / rollout_tp) * head_dim * b.
                While Megatron trains, vLLM sleeps (KV freed, weights off the GPU): 0.
    overhead    FIXED_OVERHEAD_GIB in every phase (CUDA context, NCCL, fragmentation).

    Phases (peak = the largest): rollout = Megatron states left resident (params/grads/optimizer
    not offloaded) + vLLM budget; actor train = actor weights+grads+optimizer+activations + the
    other models' resident states; critic train likewise. Offload flags move a state off the GPU
    outside the phase that needs it.
    """
    b = p.dtype_bytes
    pc = count_params(shape)
    s = p.max_prompt_length + p.max_response_length
    opt_per_param = 8 + (4 if b < 4 else 0)

    def model_mem(tp: int, pp: int, mb: int, trainable: bool, value_head: bool, offload) -> ModelMemory:
        n = params_per_gpu(pc, shape, tp, pp, value_head=value_head)
        weights = n * b
        grads = n * 4.0 if trainable else 0.0
        opt_shards = (p.world_size // (tp * pp)) if p.distributed_optimizer else 1  # dp * cp
        optimizer = n * opt_per_param / opt_shards if trainable else 0.0
        act = 0.0
        if trainable:
            per_layer = ACT_BYTES_PER_SBH * s * mb * shape.hidden / tp
            stage_layers = math.ceil(shape.layers / pp)
            logits = 0.0 if value_head else 2 * 4 * s * mb * padded_vocab(shape.vocab, tp) / tp
            first = stage_layers * pp * per_layer  # 1F1B warm-up: pp micro-batches in flight
            last = stage_layers * per_layer + logits
            act = last if pp == 1 else max(first, last)
        off_w, off_g, off_o = offload
        resident = (0 if off_w else weights) + (0 if off_g else grads) + (0 if off_o else optimizer)
        return ModelMemory(params=n, weights=weights, grads=grads, optimizer=optimizer, activations=act,
                           resident_in_rollout=resident)

    actor = model_mem(p.tp, p.pp, p.micro_batch, True, False, p.actor_offload)
    critic = model_mem(p.critic_tp, p.critic_pp, p.critic_micro_batch, True, True, p.critic_offload) if p.critic else None
    ref = model_mem(p.tp, p.pp, p.micro_batch, False, False, (p.ref_param_offload, False, False)) if p.ref else None

    gpu = p.gpu_mem_gib * GiB
    overhead = FIXED_OVERHEAD_GIB * GiB
    vllm_budget = p.gpu_memory_utilization * gpu
    vllm_weights = pc.total * b / p.rollout_tp
    vllm_other = VLLM_NON_KV_GIB * GiB
    vllm_kv = vllm_budget - vllm_weights - vllm_other
    kv_per_token = 2 * shape.layers * math.ceil(shape.kv_heads / p.rollout_tp) * shape.head_dim * b
    kv_tokens = max(0, int(vllm_kv // kv_per_token))
    rollout_dp = p.world_size // p.rollout_tp
    seqs_per_engine = math.ceil(p.train_batch_size * p.rollout_n / rollout_dp)

    models = {"actor": actor, "critic": critic, "ref": ref}
    resident = {k: m.resident_in_rollout for k, m in models.items() if m is not None}
    phases = {"rollout": overhead + sum(resident.values()) + vllm_budget}
    for name in ("actor", "critic"):
        m = models[name]
        if m is not None:
            others = sum(v for k, v in resident.items() if k != name)
            phases[f"{name} train"] = overhead + m.train_total + others
    peak = max(phases.values())

    problems = []
    if vllm_kv <= 0:
        problems.append(f"vLLM budget {vllm_budget / GiB:.1f} GiB is smaller than its weights + "
                        f"{VLLM_NON_KV_GIB} GiB: raise gpu_memory_utilization or rollout TP")
    elif kv_tokens < s:
        problems.append(f"KV cache holds {kv_tokens} tokens, less than one sequence of {s}")
    if peak > gpu:
        worst = max(phases, key=phases.get)
        problems.append(f"{worst} phase needs {peak / GiB:.1f} GiB > {p.gpu_mem_gib:g} GiB per GPU")
    return MemoryEstimate(
        total_params=pc.total, gpu_bytes=gpu, actor=actor, critic=critic, ref=ref, vllm_budget=vllm_budget,
        vllm_weights=vllm_weights, vllm_other=vllm_other, vllm_kv=max(0.0, vllm_kv), kv_bytes_per_token=kv_per_token,
        kv_tokens=kv_tokens, seq_len=s, seqs_per_engine=seqs_per_engine, overhead=overhead, phases=phases,
        peak=peak, fits=not problems, problems=problems,
    )


# ---------------------------------------------------------------------------------------
# config -> inputs
# ---------------------------------------------------------------------------------------

_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4, "float": 4}


def _get_raw(cfg, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


def _get(cfg, key: str):
    val = _get_raw(cfg, key)
    return DEFAULTS.get(key) if val is None else val


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def plan_inputs_from_config(cfg, nodes: int | None, gpus_per_node: int | None, gpu_mem_gib: float) -> PlanInputs:
    """Read the verl-style keys (see DEFAULTS) into PlanInputs."""
    g = lambda k: _get(cfg, k)  # noqa: E731
    dtype = str(g("actor_rollout_ref.model.dtype")).lower()
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"actor_rollout_ref.model.dtype={dtype!r}: expected one of {sorted(_DTYPE_BYTES)}")
    tp = int(g("actor_rollout_ref.actor.megatron.tensor_model_parallel_size"))
    pp = int(g("actor_rollout_ref.actor.megatron.pipeline_model_parallel_size"))
    rollout_tp = g("actor_rollout_ref.rollout.tensor_model_parallel_size")
    # verl spells it under megatron.; accept both, the short form first.
    dist_opt = _get_raw(cfg, "actor_rollout_ref.actor.use_distributed_optimizer")
    if dist_opt is None:
        dist_opt = _get_raw(cfg, "actor_rollout_ref.actor.megatron.use_distributed_optimizer")
    if dist_opt is None:
        dist_opt = DEFAULTS["actor_rollout_ref.actor.use_distributed_optimizer"]
    mb = int(g("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"))
    critic_mb = g("critic.ppo_micro_batch_size_per_gpu")
    return PlanInputs(
        nodes=int(nodes if nodes is not None else g("trainer.nnodes")),
        gpus_per_node=int(gpus_per_node if gpus_per_node is not None else g("trainer.n_gpus_per_node")),
        gpu_mem_gib=float(gpu_mem_gib), dtype_bytes=_DTYPE_BYTES[dtype], tp=tp, pp=pp,
        cp=int(g("actor_rollout_ref.actor.megatron.context_parallel_size")),
        rollout_tp=int(rollout_tp if rollout_tp is not None else tp),
        gpu_memory_utilization=float(g("actor_rollout_ref.rollout.gpu_memory_utilization")),
        rollout_n=int(g("actor_rollout_ref.rollout.n")),
        distributed_optimizer=_bool(dist_opt), micro_batch=mb,
        max_prompt_length=int(g("data.max_prompt_length")), max_response_length=int(g("data.max_response_length")),
        train_batch_size=int(g("data.train_batch_size")),
        critic=str(g("algorithm.adv_estimator")).lower() == "gae",
        critic_tp=int(g("critic.megatron.tensor_model_parallel_size") or tp),
        critic_pp=int(g("critic.megatron.pipeline_model_parallel_size") or pp),
        critic_micro_batch=int(critic_mb if critic_mb is not None else mb),
        ref=_bool(g("actor_rollout_ref.actor.use_kl_loss")) or _bool(g("algorithm.use_kl_in_reward")),
        actor_offload=tuple(_bool(g(f"actor_rollout_ref.actor.megatron.{k}_offload")) for k in ("param", "grad", "optimizer")),
        critic_offload=tuple(_bool(g(f"critic.megatron.{k}_offload")) for k in ("param", "grad", "optimizer")),
        ref_param_offload=_bool(g("actor_rollout_ref.ref.megatron.param_offload")),
    )


def load_hf_config(path: str) -> dict:
    """config.json of a HF checkpoint directory (or the file itself)."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"no config.json at {path!r} (actor_rollout_ref.model.path)")
    with open(f) as fh:
        return json.load(fh)


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------

def _g(x: float) -> str:
    return f"{x / GiB:7.2f}"


def format_report(shape: ModelShape, p: PlanInputs, est: MemoryEstimate) -> list[str]:
    lines = [
        f"model: {shape.arch}, {est.total_params / 1e9:.3f} B params (hidden {shape.hidden}, layers {shape.layers}, "
        f"heads {shape.heads}/{shape.kv_heads} kv, vocab {shape.vocab}, tied {shape.tied}), dtype bytes {p.dtype_bytes}",
        f"memory per GPU (GiB), most loaded pipeline stage; GPU {p.gpu_mem_gib:g} GiB; "
        f"distributed optimizer {'on' if p.distributed_optimizer else 'off'}; seq {est.seq_len}, micro-batch {p.micro_batch}",
        f"  {'':<22}{'params':>9} {'weights':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'train':>7} {'in rollout':>10}",
    ]
    rows = [("actor", f"tp{p.tp} pp{p.pp}", est.actor), ("critic", f"tp{p.critic_tp} pp{p.critic_pp}", est.critic),
            ("ref", f"tp{p.tp} pp{p.pp}", est.ref)]
    for name, par, m in rows:
        if m is None:
            why = "no critic (adv_estimator != gae)" if name == "critic" else "no reference (no KL term)"
            lines.append(f"  {name:<7}{'':<15}  -- {why}")
            continue
        lines.append(f"  {name:<7}{par:<15}{m.params / 1e6:8.1f}M {_g(m.weights)} {_g(m.grads)} {_g(m.optimizer)} "
                     f"{_g(m.activations)} {_g(m.train_total)} {_g(m.resident_in_rollout):>10}")
    lines += [
        f"  vLLM (tp {p.rollout_tp}, gpu_memory_utilization {p.gpu_memory_utilization:g} = {est.vllm_budget / GiB:.2f} GiB): "
        f"weights {est.vllm_weights / GiB:.2f}, other {est.vllm_other / GiB:.2f}, KV cache {est.vllm_kv / GiB:.2f} GiB "
        f"= {est.kv_tokens} tokens = {est.kv_tokens // max(1, est.seq_len)} sequences of {est.seq_len} at once "
        f"(each engine generates {est.seqs_per_engine} per step)",
        f"  fixed overhead {est.overhead / GiB:.2f} GiB",
        "  phases: " + " | ".join(f"{k} {v / GiB:.2f}" for k, v in est.phases.items()),
        f"peak {est.peak / GiB:.2f} GiB of {p.gpu_mem_gib:g} GiB: " + ("FITS" if est.fits else "DOES NOT FIT"),
    ]
    lines += [f"  problem: {msg}" for msg in est.problems]
    return lines


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mcore-rl plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="verl-style key=value config overrides")
    ap.add_argument("--nodes", type=int, default=None, help="number of nodes (default: trainer.nnodes or 1)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: trainer.n_gpus_per_node or 8)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--json", action="store_true", help="print the layout and estimate as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    from omegaconf import OmegaConf

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"mcore-rl plan: expected key=value overrides, got {bad}", file=sys.stderr)
        return 2
    try:
        cfg = OmegaConf.from_dotlist(args.overrides)
        model_path = _get(cfg, "actor_rollout_ref.model.path")
        if not model_path:
            raise ValueError("actor_rollout_ref.model.path=DIR (a HF checkpoint with config.json) is required")
        shape = model_shape_from_hf(load_hf_config(str(model_path)))
        p = plan_inputs_from_config(cfg, args.nodes, args.gpus_per_node, args.gpu_mem_gib)
        layout = rank_layout(p.world_size, p.tp, p.pp, p.cp, rollout_tp=p.rollout_tp)
        if p.critic and (p.critic_tp, p.critic_pp) != (p.tp, p.pp):
            rank_layout(p.world_size, p.critic_tp, p.critic_pp, p.cp)  # validates the critic's grid too
        est = estimate_memory(shape, p)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"mcore-rl plan: {e}", file=sys.stderr)
        return 2
    env = LaunchEnv(rank=0, world_size=p.world_size, local_rank=0, local_world_size=p.gpus_per_node, node_rank=0,
                    num_nodes=p.nodes, master_addr="", master_port=0, launcher="single" if p.world_size == 1 else "torchrun")
    if args.json:
        print(json.dumps({"layout": {"tp_groups": layout.tp_groups, "pp_groups": layout.pp_groups,
                                     "dp_groups": layout.dp_groups, "rollout_groups": layout.rollout_groups},
                          "inputs": asdict(p), "estimate": asdict(est)}, indent=1, default=str))
        return 0
    for line in describe_layout(layout, env):
        print(line)
    if p.critic and (p.critic_tp, p.critic_pp) != (p.tp, p.pp):
        print(f"critic uses its own grid: tp {p.critic_tp} x pp {p.critic_pp}")
    for line in format_report(shape, p, est):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
