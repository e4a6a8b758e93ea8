"""Per-GPU memory of a PPO/GRPO job, estimated before it is queued (`mcore-rl plan`): every GPU
when colocated; with split placement the training GPUs and the rollout GPUs, each side its own.

The model's shape is `ArchSpec`, the trainer's reading of its config.json (no weights, no GPU);
parameters are counted as megatron-core allocates them, padded vocab included
(`ArchSpec.padded_vocab_size`, what `models.build.build_model` builds). The job's sizes come
from the trainer's config, read as the trainer reads it (`job_shape_from_config`). All numbers
are estimates; the formulas and their assumptions are in `estimate_memory`. Micro-batches are
rows x the padded length, or with `actor.use_dynamic_bsz` up to each pass's token budget
(`*_max_token_len_per_gpu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mcore_rl.config import needs_reference, train_world_size, uses_critic
from mcore_rl.models.arch import ArchSpec, arch_from_hf_config

__all__ = ["ParamCounts", "JobShape", "ModelMemory", "MemoryEstimate", "count_params", "params_per_gpu",
           "layer_activation_bytes", "saved_activation_bytes", "estimate_memory", "job_shape_from_config",
           "model_spec"]

GiB = 1024**3

# Constants of the estimate (see estimate_memory).
LOGPROB_CHUNK_BYTES = 256 << 20  # mcore_rl.models.forward.CHUNK_BYTES (not imported: the estimate needs no torch)
LOGPROB_TEMP_BYTES = 3 * LOGPROB_CHUNK_BYTES  # fp32 temporaries of one chunk: probabilities, gradient, scatter
FIXED_OVERHEAD_GIB = 1.5  # CUDA context, NCCL buffers, allocator slack, per GPU, always present
VLLM_NON_KV_GIB = 1.5  # vLLM's profiled activation peak + CUDA graphs, inside its budget
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # actor_rollout_ref.model.dtype


# ---------------------------------------------------------------------------------------
# parameter count
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamCounts:
    """Parameters by where megatron puts them. *_sharded are split over TP; the rest is
    replicated in every TP rank (norms, row-parallel biases, learned positions)."""

    embedding: int  # vocab x hidden, unpadded
    first_extra: int  # replicated, first stage only (learned positions)
    layer_sharded: int
    layer_replicated: int
    last_extra: int  # replicated, last stage only (final norm)
    lm_head: int  # 0 when tied to the embedding
    layers: int

    @property
    def total(self) -> int:
        """What HF reports (tied weights counted once)."""
        return (self.embedding + self.first_extra + self.layers * (self.layer_sharded + self.layer_replicated)
                + self.last_extra + self.lm_head)


def count_params(spec: ArchSpec) -> ParamCounts:
    """Exact parameter count of the model, split by how megatron shards it."""
    h, f = spec.hidden_size, spec.ffn_hidden_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_query_groups * spec.head_dim
    fc1 = f * (2 if spec.gated_mlp else 1)
    norm = h * (2 if spec.normalization == "LayerNorm" else 1)
    sharded = (h * (q + 2 * kv) + ((q + 2 * kv) if spec.qkv_bias else 0)  # q,k,v (column parallel)
               + q * h  # output projection (row parallel)
               + h * fc1 + (fc1 if spec.linear_bias else 0)  # fc1 (gate+up when gated)
               + f * h)  # fc2 (row parallel)
    replicated = (2 * norm + (2 * h if spec.linear_bias else 0)  # two norms, the row-parallel biases
                  + (2 * spec.head_dim if spec.qk_layernorm else 0))
    positions = ((spec.max_position_embeddings + spec.position_offset) * h
                 if spec.position_embedding == "learned_absolute" else 0)
    return ParamCounts(
        embedding=spec.vocab_size * h, first_extra=positions, layer_sharded=sharded, layer_replicated=replicated,
        last_extra=norm, lm_head=0 if spec.tied_embeddings else spec.vocab_size * h, layers=spec.num_layers,
    )


def lora_params_per_gpu(spec: ArchSpec, rank: int, targets, tp: int, pp: int) -> int:
    """LoRA adapter parameters on one GPU of a stage of ceil(L/pp) layers: r x (in + out) per
    targeted module, the half that follows its layer's TP split divided by tp (B of a
    column-parallel module, A of a row-parallel one)."""
    from converters.mapping import COLUMN_KINDS, hf_module, lora_linears

    h, f = spec.hidden_size, spec.ffn_hidden_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_query_groups * spec.head_dim

    def shapes(rule) -> list[tuple[int, int]]:
        """(in, out) of each HF linear the converter's rule fuses."""
        if rule.kind == "qkv":
            return [(h, q), (h, kv), (h, kv)]
        if rule.kind == "row":
            return [(q, h) if ".linear_proj." in rule.mcore else (f, h)]
        return [(h, f)] * len(rule.hf)  # gate_up, col (fc1)

    per_layer = 0.0
    for rule in lora_linears(spec):
        column = rule.kind in COLUMN_KINDS
        for name, (fan_in, fan_out) in zip((hf_module(n) for n in rule.hf), shapes(rule)):
            if name in targets:
                per_layer += rank * (fan_in + fan_out / tp) if column else rank * (fan_in / tp + fan_out)
    return round(math.ceil(spec.num_layers / pp) * per_layer)


def params_per_gpu(pc: ParamCounts, spec: ArchSpec, tp: int, pp: int, value_head: bool = False) -> int:
    """Parameters held by one GPU of the most loaded pipeline stage (first or last).

    Layers are split ceil(L/pp) per stage; the embedding (vocab padded as the model pads it,
    `ArchSpec.padded_vocab_size`) sits on the first stage and the output layer on the last
    (tied embeddings: the last stage keeps its own copy when pp > 1, as megatron does). A
    critic's output layer is a value head, hidden -> 1 with a bias.
    """
    h = spec.hidden_size
    per_layer = pc.layer_sharded / tp + pc.layer_replicated
    stage_layers = math.ceil(pc.layers / pp)
    emb = spec.padded_vocab_size * h / tp
    out = h + 1 if value_head else emb
    needs_out = value_head or not spec.tied_embeddings or pp > 1
    if pp == 1:
        return round(stage_layers * per_layer + emb + pc.first_extra + pc.last_extra + (out if needs_out else 0))
    first = stage_layers * per_layer + emb + pc.first_extra
    last = stage_layers * per_layer + pc.last_extra + out
    return round(max(first, last))


# ---------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------

def layer_activation_bytes(spec: ArchSpec, tp: int, b: int) -> float:
    """Bytes one transformer layer saves for backward, per token, on one TP rank: what autograd
    keeps in megatron-core's local spec with `SDPAttention` (b = bytes of the params dtype).

    Full width on every TP rank (the local spec has no sequence parallelism): the two norms'
    inputs (fused RMSNorm / LayerNorm keep the input and a per-token statistic) and the inputs
    of the column-parallel QKV and fc1 projections. Split over TP: the fused QKV output (the
    attention keeps V, a view of it), Q and K after RoPE, the attention output (also the output
    projection's input) and its fp32 log-sum-exp; the MLP's fc1 output, the activation, the GLU's
    linear half and the fc2 input (5 ffn widths gated, 1 for relu, 2 otherwise). Attention keeps
    no seq x seq matrix: SDPA is_causal runs flash / memory-efficient kernels on GPU and a fused
    one on CPU, and the packed kernels (varlen, flex, per-sequence SDPA) keep the same tensors.
    RoPE keeps cos/sin per token (packed; per position padded). Q/K norms keep their inputs.
    """
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    full = 4 * b * h + 2 * 8  # two norm inputs, QKV and fc1 inputs; fp32 rstd (LayerNorm: mean + rstd)
    attn = b * (q + 2 * kv) + b * q + 4 * spec.num_attention_heads  # QKV output, attention output, lse
    if spec.position_embedding == "rope":
        attn += b * (q + kv)  # Q and K after RoPE
        full += 4 * d * b  # cos and sin of Q and K
    if spec.qk_layernorm:
        attn += b * (q + kv)
    mlp = b * f * (5 if spec.gated_mlp else 1 if spec.activation == "relu" else 2)
    return full + (attn + mlp) / tp


def saved_activation_bytes(spec: ArchSpec, tokens: int, layers: int, tp: int, b: int, head: str | None) -> float:
    """Bytes a micro-batch of `tokens` saves for backward on one GPU holding `layers` layers;
    `head` "logits" or "value" adds the last stage: the final norm's and the output layer's
    inputs, and for logits the [tokens, vocab/tp] logits the log-prob keeps (params dtype)."""
    saved = layers * layer_activation_bytes(spec, tp, b)
    if head is not None:
        saved += 2 * b * spec.hidden_size + 8
    if head == "logits":
        saved += b * spec.padded_vocab_size / tp
    return tokens * saved


# ---------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------

@dataclass
class JobShape:
    """The job as the estimate sees it: the machine, and the sizes the trainer's config sets
    (`job_shape_from_config`)."""

    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    dtype_bytes: int
    tp: int
    pp: int
    rollout_tp: int
    gpu_memory_utilization: float
    kv_cache_gib: float | None  # a fixed KV cache instead of what gpu_memory_utilization leaves
    free_cache_engine: bool  # vLLM sleeps (weights and KV cache off the GPU) while Megatron trains
    rollout_n: int
    distributed_optimizer: bool
    micro_batch: int
    critic_micro_batch: int
    max_prompt_length: int
    max_response_length: int
    train_batch_size: int
    critic: bool
    ref: bool
    log_prob_micro_batch: int  # rollout.log_prob_micro_batch_size_per_gpu (old log-probs)
    ref_log_prob_micro_batch: int  # ref.log_prob_micro_batch_size_per_gpu
    dynamic_bsz: bool  # actor.use_dynamic_bsz: every pass on packed micro-batches of the budgets below
    ppo_max_token_len: int  # actor.ppo_max_token_len_per_gpu (actor update)
    log_prob_max_token_len: int  # rollout.log_prob_max_token_len_per_gpu (old log-probs)
    ref_log_prob_max_token_len: int  # ref.log_prob_max_token_len_per_gpu
    critic_max_token_len: int  # critic.ppo_max_token_len_per_gpu (values and critic update)
    rollout_gpus: int = 0  # split placement: the job's last GPUs, that only generate (0: colocated)
    lora_rank: int = 0  # LoRA on the actor (0: full fine-tuning)
    lora_targets: tuple = ()  # the HF modules it adapts

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def split(self) -> bool:
        return self.rollout_gpus > 0

    @property
    def train_world(self) -> int:
        """GPUs that train: the first world - rollout_gpus (colocated: all)."""
        return self.world_size - self.rollout_gpus

    @property
    def rollout_world(self) -> int:
        """GPUs that run vLLM engines: the last rollout_gpus (colocated: all)."""
        return self.rollout_gpus or self.world_size

    @property
    def seq_len(self) -> int:
        return self.max_prompt_length + self.max_response_length

    def micro_batches(self) -> dict[str, tuple[str, int, int]]:
        """Each model pass -> (the config key that sizes its micro-batches, its value, tokens per
        micro-batch at most): the token budget when packed, rows x the padded length otherwise."""
        s, a = self.seq_len, "actor_rollout_ref."
        if self.dynamic_bsz:
            keys = {"actor train": (a + "actor.ppo_max_token_len_per_gpu", self.ppo_max_token_len),
                    "old log-probs": (a + "rollout.log_prob_max_token_len_per_gpu", self.log_prob_max_token_len),
                    "ref log-probs": (a + "ref.log_prob_max_token_len_per_gpu", self.ref_log_prob_max_token_len),
                    "critic train": ("critic.ppo_max_token_len_per_gpu", self.critic_max_token_len)}
            return {k: (key, v, v) for k, (key, v) in keys.items()}
        keys = {"actor train": (a + "actor.ppo_micro_batch_size_per_gpu", self.micro_batch),
                "old log-probs": (a + "rollout.log_prob_micro_batch_size_per_gpu", self.log_prob_micro_batch),
                "ref log-probs": (a + "ref.log_prob_micro_batch_size_per_gpu", self.ref_log_prob_micro_batch),
                "critic train": ("critic.ppo_micro_batch_size_per_gpu", self.critic_micro_batch)}
        return {k: (key, v, v * s) for k, (key, v) in keys.items()}


@dataclass
class ModelMemory:
    params: int  # per GPU
    weights: float  # bytes per GPU
    grads: float
    optimizer: float
    activations: float  # the training micro-batches' peak, beyond the states

    @property
    def resident(self) -> float:
        """What stays on the GPU outside its own training phase."""
        return self.weights + self.grads + self.optimizer

    @property
    def train_total(self) -> float:
        return self.resident + self.activations


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
    micro_batch_bytes: dict[str, float] = field(default_factory=dict)  # pass -> its micro-batch peak, beyond states
    phases: dict[str, float] = field(default_factory=dict)  # of a training GPU (colocated: of every GPU)
    peak: float = 0.0
    peak_phase: str = ""
    fits: bool = False  # every GPU fits, both sides when split
    rollout_gpu_phases: dict[str, float] = field(default_factory=dict)  # split: of a rollout GPU ({} colocated)
    rollout_gpu_peak: float = 0.0  # split: a rollout GPU's peak (0 colocated: the rollout is in `phases`)
    problems: list[str] = field(default_factory=list)


def train_activation_bytes(spec: ArchSpec, tokens: int, tp: int, pp: int, b: int, value_head: bool) -> float:
    """Peak bytes of one training micro-batch of `tokens` beyond the model's states, on the most
    loaded pipeline stage. PP 1F1B: the first stage holds pp micro-batches in flight; the last one
    holds its own, plus the logits' gradient [tokens, vocab/tp] (params dtype, as the log-prob's
    backward writes it; on the padded path megatron's [s, b] -> [b, s] copy of the logits is its
    twin in the forward) and the log-prob's chunk temporaries."""
    layers = math.ceil(spec.num_layers / pp)
    head = "value" if value_head else "logits"
    last = saved_activation_bytes(spec, tokens, layers, tp, b, head)
    if not value_head:
        last += tokens * b * spec.padded_vocab_size / tp + LOGPROB_TEMP_BYTES
    first = saved_activation_bytes(spec, tokens, layers, tp, b, None) * pp
    return last if pp == 1 else max(first, last)


def logprob_pass_bytes(spec: ArchSpec, tokens: int, rows: int, tp: int, b: int) -> float:
    """Peak bytes of one forward-only log-prob micro-batch beyond the states (nothing is saved
    for backward): its logits [tokens, vocab/tp] in the params dtype, twice on the padded path
    with more than one row (megatron's [s, b] -> [b, s] copy; packed: one row, no copy), the
    chunk temporaries, and one layer's intermediates."""
    logits = tokens * b * spec.padded_vocab_size / tp * (2 if rows > 1 else 1)
    return logits + LOGPROB_TEMP_BYTES + tokens * layer_activation_bytes(spec, tp, b)


def estimate_memory(spec: ArchSpec, p: JobShape) -> MemoryEstimate:
    """Per-GPU memory, in bytes, of one PPO/GRPO rank. Formulas (b = dtype bytes,
    P = parameters on this GPU from `params_per_gpu`, L = layers, h = hidden size):

    weights     P * b                          (bf16/fp16: 2, fp32: 4)
    grads       P * 4                          megatron's main-grad buffer is fp32 for 16-bit
                                               training; it is not sharded by the distributed
                                               optimizer (reduce-scatter into it)
    optimizer   P * (8 + 4 if b < 4 else 8)    Adam exp_avg + exp_avg_sq fp32 (8) + fp32 master
                / dp with the                  copy of 16-bit params (4); the distributed optimizer
                distributed optimizer          shards it over the data-parallel group
    micro-batch tokens per micro-batch: the token budget with actor.use_dynamic_bsz (packed: at
                most that many real tokens), else rows x (max_prompt + max_response) (padded).
                Training: `train_activation_bytes` (per-layer bytes from `layer_activation_bytes`,
                no recompute; PP: the first stage holds pp micro-batches in flight, each of up to
                the same tokens; the last stage the logits, their gradient and the log-prob's
                chunk temporaries). Forward-only log-prob passes: `logprob_pass_bytes`. The
                critic's value head has no vocab-sized logits; its forward-only value pass is
                smaller than its update. The critic shares the actor's TP/PP grid (megatron's
                parallel state is global).
    ref         weights only (no grads/optimizer/backward), present when a KL term is used
                (not with LoRA: the actor with its adapters off is the reference).
    LoRA        the actor's weights gain the adapters (`lora_params_per_gpu`); grads and
                optimizer are the adapters' alone; activations as full training (the gradient
                still flows through every layer).
    vLLM        its budget is gpu_memory_utilization * GPU memory (or weights + VLLM_NON_KV_GIB
                + rollout.kv_cache_gib when that is set); inside it: weights (all params * b /
                rollout_tp), VLLM_NON_KV_GIB for profiled activations and CUDA graphs, and the
                rest is KV cache. KV per token per GPU = 2 (K,V) * L * ceil(kv_heads / rollout_tp)
                * head_dim * b. While Megatron trains, vLLM sleeps (rollout.free_cache_engine:
                KV freed, weights off the GPU) or keeps its whole budget. Each of the
                rollout_world / rollout_tp engines generates its share of the step's sequences.
    overhead    FIXED_OVERHEAD_GIB in every phase (CUDA context, NCCL, fragmentation).

    Phases (peak = the largest): rollout = every Megatron model's states + vLLM budget; old
    log-probs / ref log-probs = every model's states + that pass's micro-batch (+ vLLM when it
    does not sleep); actor train = actor states + activations + the other models' states
    (+ vLLM when it does not sleep); critic train likewise.

    Split placement: the models' grid (DP) is over the training GPUs alone, which hold the
    Megatron phases without vLLM (no rollout phase); a rollout GPU holds only overhead + vLLM's
    budget (`rollout_gpu_phases`, its engine never sleeps). `fits` needs both sides to fit.
    """
    b = p.dtype_bytes
    pc = count_params(spec)
    s = p.seq_len
    opt_per_param = 8 + (4 if b < 4 else 0)
    dp = p.train_world // (p.tp * p.pp)
    mbs = p.micro_batches()

    def model_mem(trainable: bool, value_head: bool, lora: int = 0) -> ModelMemory:
        """`lora`: adapter parameters; only they have gradients and optimizer state."""
        n = params_per_gpu(pc, spec, p.tp, p.pp, value_head=value_head) + lora
        act = 0.0
        if trainable:
            tokens = mbs["critic train" if value_head else "actor train"][2]
            act = train_activation_bytes(spec, tokens, p.tp, p.pp, b, value_head)
        t = (lora or n) if trainable else 0
        return ModelMemory(params=n, weights=n * b, grads=t * 4.0,
                           optimizer=t * opt_per_param / (dp if p.distributed_optimizer else 1), activations=act)

    lora = lora_params_per_gpu(spec, p.lora_rank, p.lora_targets, p.tp, p.pp) if p.lora_rank else 0
    actor = model_mem(True, False, lora)
    critic = model_mem(True, True) if p.critic else None
    ref = model_mem(False, False) if p.ref and not lora else None  # LoRA: the actor without adapters

    gpu = p.gpu_mem_gib * GiB
    overhead = FIXED_OVERHEAD_GIB * GiB
    vllm_weights = pc.total * b / p.rollout_tp
    vllm_other = VLLM_NON_KV_GIB * GiB
    if p.kv_cache_gib:
        vllm_budget = vllm_weights + vllm_other + p.kv_cache_gib * GiB
    else:
        vllm_budget = p.gpu_memory_utilization * gpu
    vllm_kv = vllm_budget - vllm_weights - vllm_other
    kv_per_token = 2 * spec.num_layers * math.ceil(spec.num_query_groups / p.rollout_tp) * spec.head_dim * b
    kv_tokens = max(0, int(vllm_kv // kv_per_token))
    rollout_dp = p.rollout_world // p.rollout_tp
    seqs_per_engine = math.ceil(p.train_batch_size * p.rollout_n / rollout_dp)

    models = {"actor": actor, "critic": critic, "ref": ref}
    resident = {k: m.resident for k, m in models.items() if m is not None}
    vllm_in_training = 0.0 if p.free_cache_engine or p.split else vllm_budget
    states = sum(resident.values())
    # forward-only log-prob passes: logits live on the last stage only
    passes = {"old log-probs": True, "ref log-probs": p.ref}
    mb_bytes = {name: logprob_pass_bytes(spec, mbs[name][2], 1 if p.dynamic_bsz else mbs[name][1], p.tp, b)
                for name, on in passes.items() if on}
    mb_bytes["actor train"] = actor.activations
    if critic is not None:
        mb_bytes["critic train"] = critic.activations
    phases = {} if p.split else {"rollout": overhead + states + vllm_budget}
    for name in ("old log-probs", "ref log-probs"):
        if name in mb_bytes:
            phases[name] = overhead + states + vllm_in_training + mb_bytes[name]
    for name in ("actor", "critic"):
        if models[name] is not None:
            phases[f"{name} train"] = overhead + states + vllm_in_training + mb_bytes[f"{name} train"]
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    rollout_gpu_phases = {"rollout": overhead + vllm_budget} if p.split else {}
    rollout_gpu_peak = rollout_gpu_phases.get("rollout", 0.0)

    problems = []
    if vllm_kv <= 0:
        problems.append(f"vLLM budget {vllm_budget / GiB:.1f} GiB is smaller than its weights + "
                        f"{VLLM_NON_KV_GIB} GiB: raise gpu_memory_utilization or rollout TP")
    elif kv_tokens < s:
        problems.append(f"KV cache holds {kv_tokens} tokens, less than one sequence of {s}")
    if peak > gpu:
        hint = f" (lower {mbs[peak_phase][0]})" if peak_phase in mbs else ""
        where = "training GPU" if p.split else "GPU"
        problems.append(f"{peak_phase} phase needs {peak / GiB:.1f} GiB > {p.gpu_mem_gib:g} GiB per {where}{hint}")
    if rollout_gpu_peak > gpu:
        problems.append(f"rollout GPUs need {rollout_gpu_peak / GiB:.1f} GiB (vLLM's budget + {FIXED_OVERHEAD_GIB} GiB "
                        f"overhead) > {p.gpu_mem_gib:g} GiB: lower actor_rollout_ref.rollout."
                        + ("kv_cache_gib" if p.kv_cache_gib else "gpu_memory_utilization"))
    return MemoryEstimate(
        total_params=pc.total, gpu_bytes=gpu, actor=actor, critic=critic, ref=ref, vllm_budget=vllm_budget,
        vllm_weights=vllm_weights, vllm_other=vllm_other, vllm_kv=max(0.0, vllm_kv), kv_bytes_per_token=kv_per_token,
        kv_tokens=kv_tokens, seq_len=s, seqs_per_engine=seqs_per_engine, overhead=overhead,
        micro_batch_bytes=mb_bytes, phases=phases, peak=peak, peak_phase=peak_phase, fits=not problems,
        problems=problems, rollout_gpu_phases=rollout_gpu_phases, rollout_gpu_peak=rollout_gpu_peak,
    )


# ---------------------------------------------------------------------------------------
# config -> model and job
# ---------------------------------------------------------------------------------------

def model_spec(cfg) -> ArchSpec:
    """The model the trainer would build: `actor_rollout_ref.model.path`, or the toy model."""
    path = cfg.actor_rollout_ref.model.path
    if path:
        return arch_from_hf_config(str(path))
    if cfg.data.dataset_name != "toy":
        raise ValueError("actor_rollout_ref.model.path is required (only the toy dataset builds its own model)")
    from mcore_rl.toy import TOY_MODEL_CONFIG, TOY_VOCAB

    return arch_from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": len(TOY_VOCAB), **TOY_MODEL_CONFIG})


def job_shape_from_config(cfg, nodes: int, gpus_per_node: int, gpu_mem_gib: float) -> JobShape:
    """The trainer's config keys, as the trainer reads them, on `nodes` x `gpus_per_node` GPUs."""
    a, r = cfg.actor_rollout_ref, cfg.actor_rollout_ref.rollout
    world = nodes * gpus_per_node
    return JobShape(
        nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=float(gpu_mem_gib),
        dtype_bytes=DTYPE_BYTES[a.model.dtype],
        tp=a.actor.megatron.tensor_model_parallel_size, pp=a.actor.megatron.pipeline_model_parallel_size,
        rollout_tp=r.tensor_model_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
        kv_cache_gib=r.kv_cache_gib, free_cache_engine=r.free_cache_engine, rollout_n=r.n,
        distributed_optimizer=a.actor.use_distributed_optimizer,
        micro_batch=a.actor.ppo_micro_batch_size_per_gpu, critic_micro_batch=cfg.critic.ppo_micro_batch_size_per_gpu,
        max_prompt_length=cfg.data.max_prompt_length, max_response_length=cfg.data.max_response_length,
        train_batch_size=cfg.data.train_batch_size,
        critic=uses_critic(cfg), ref=needs_reference(cfg),
        log_prob_micro_batch=r.log_prob_micro_batch_size_per_gpu,
        ref_log_prob_micro_batch=a.ref.log_prob_micro_batch_size_per_gpu,
        dynamic_bsz=a.actor.use_dynamic_bsz, ppo_max_token_len=a.actor.ppo_max_token_len_per_gpu,
        log_prob_max_token_len=r.log_prob_max_token_len_per_gpu,
        ref_log_prob_max_token_len=a.ref.log_prob_max_token_len_per_gpu,
        critic_max_token_len=cfg.critic.ppo_max_token_len_per_gpu,
        rollout_gpus=world - train_world_size(cfg, world),
        lora_rank=a.model.lora_rank,
        lora_targets=lora_targets_of(cfg) if a.model.lora_rank else (),
    )


def lora_targets_of(cfg) -> tuple:
    from mcore_rl.models.lora import resolve_targets

    return resolve_targets(cfg.actor_rollout_ref.model.target_modules, model_spec(cfg))
