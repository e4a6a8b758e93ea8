"""`mcore-rl plan`: parameter counts against HF and megatron-core models, memory numbers against a
hand calculation, activations against what autograd saves (CPU) and a measured GPU peak, and the
command line reading the trainer's config."""

import json
import os

import pytest

from mcore_rl import memory
from mcore_rl.commands import plan
from mcore_rl.models.arch import arch_from_hf_config
from mcore_rl.memory import GiB, JobShape, count_params, estimate_memory, params_per_gpu, saved_activation_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small Llama-shaped model with round numbers; vocab 31990 pads to 32000.
CFG = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
       "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 31990, "tie_word_embeddings": False,
       "max_position_embeddings": 4096}
# The inputs of the hand calculation: what each test does not set.
BASE = dict(nodes=1, gpus_per_node=1, gpu_mem_gib=80, dtype_bytes=2, tp=1, pp=1, rollout_tp=1,
            gpu_memory_utilization=0.5, kv_cache_gib=None, free_cache_engine=True, rollout_n=1,
            distributed_optimizer=False, micro_batch=1, critic_micro_batch=1, max_prompt_length=512,
            max_response_length=512, train_batch_size=16, critic=True, ref=False, log_prob_micro_batch=2,
            ref_log_prob_micro_batch=2, dynamic_bsz=False, ppo_max_token_len=16384, log_prob_max_token_len=16384,
            ref_log_prob_max_token_len=16384, critic_max_token_len=32768)


def inputs(**kw) -> JobShape:
    return JobShape(**{**BASE, **kw})


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    return str(tmp_path)


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("qwen2", {"tie_word_embeddings": False}),
    ("qwen3", {}), ("mistral", {}), ("opt", {}), ("opt", {"tie_word_embeddings": False}),
])
def test_param_count_matches_hf(arch, overrides):
    import torch
    import transformers as tf

    from conftest import tiny_hf_config

    cfg = tiny_hf_config(arch, **overrides)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    spec = arch_from_hf_config(cfg.to_dict())
    assert count_params(spec).total == sum(p.numel() for p in model.parameters()) == spec.num_params()


def test_param_count_of_the_hand_model_matches_hf():
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{k: v for k, v in CFG.items() if k != "model_type"}))
    assert sum(p.numel() for p in model.parameters()) == 187_167_744


def _megatron_params_worker(hf_path):
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model

    init_distributed(2, 1)
    spec = arch_from_hf_config(hf_path)
    return [sum(p.numel() for p in build_model(spec, role=role).parameters()) for role in ("actor", "critic")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What the module's 2-rank workers return, both run by one pair of processes: {"params": the
    per-rank parameter counts of a tiny Llama of vocab 300 (and its path), "saved": the per-rank
    saved-activation bytes of SAVED_CFGS}."""
    from conftest import make_tiny_hf_model
    from dist_utils import in_turn, run_ranks

    path = make_tiny_hf_model(tmp_path_factory.mktemp("plan") / "llama", "llama", vocab_size=300)
    ranks = run_ranks(in_turn, 2, {"params": (_megatron_params_worker, (path,)),
                                   "saved": (_saved_bytes_worker, (SAVED_CFGS,))})
    return {"path": path, "params": [r["params"] for r in ranks], "saved": [r["saved"] for r in ranks]}


def test_params_per_gpu_match_megatron_at_tp2(two_ranks):
    """The planner's per-GPU count is what megatron-core allocates, padded vocab included: 300 tokens pad
    to 384 (a multiple of 128, whatever TP), not to 512 (a multiple of 128 x TP)."""
    path = two_ranks["path"]
    spec = arch_from_hf_config(path)
    assert spec.padded_vocab_size == 384
    per_rank = two_ranks["params"]
    pc = count_params(spec)
    assert per_rank[0] == per_rank[1] == [params_per_gpu(pc, spec, 2, 1), params_per_gpu(pc, spec, 2, 1, value_head=True)]


def _megatron_numel_worker(paths):
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model

    init_distributed(1, 1)
    return [[sum(p.numel() for p in build_model(arch_from_hf_config(path), role=role).parameters())
             for role in ("actor", "critic")] for path in paths]


def test_param_count_is_the_built_models_numel_at_tp1(tiny_model_factory, tmp_path):
    """At TP=1 the planner's count is every parameter of the GPTModel the trainer builds, padded
    vocab, value head, tied embeddings, biases and learned positions included; and the toy model
    it plans with no model path is the one `mcore-rl train` builds."""
    from dist_utils import run_ranks

    from mcore_rl.config import load_config
    from mcore_rl.toy import build_toy_model

    paths = [tiny_model_factory("llama", vocab_size=300), tiny_model_factory("qwen2", vocab_size=300),
             tiny_model_factory("opt"), build_toy_model(tmp_path / "toy")]
    specs = [arch_from_hf_config(p) for p in paths]
    assert [s.padded_vocab_size for s in specs] == [384, 384, 256, 128]
    toy_planned = memory.model_spec(load_config(None, []))
    assert count_params(toy_planned) == count_params(specs[-1])
    numels = run_ranks(_megatron_numel_worker, 1, paths)[0]
    planned = [[params_per_gpu(count_params(s), s, 1, 1), params_per_gpu(count_params(s), s, 1, 1, value_head=True)]
               for s in specs]
    assert numels == planned


def test_memory_matches_hand_calculation():
    """8 GPUs (1 node), actor TP 2 x PP 2 (DP 2), rollout TP 2, bf16, distributed optimizer,
    micro-batch 2, sequence 512 + 1536 = 2048, GAE (critic) and a KL loss (reference)."""
    p = inputs(gpus_per_node=8, tp=2, pp=2, rollout_tp=2, distributed_optimizer=True, micro_batch=2,
               critic_micro_batch=2, max_response_length=1536, train_batch_size=64, rollout_n=4, critic=True, ref=True)
    est = estimate_memory(arch_from_hf_config(CFG), p)

    # --- parameters -----------------------------------------------------------------------
    h, L, V, Vp, ffn, q, kv = 1024, 8, 31990, 32000, 4096, 16 * 64, 4 * 64
    layer_sharded = h * (q + 2 * kv) + q * h + 3 * h * ffn  # qkv, o, gate/up/down = 15,204,352
    layer_replicated = 2 * h  # two RMSNorms
    total = 2 * V * h + L * (layer_sharded + layer_replicated) + h  # embed + lm_head + layers + final norm
    assert total == 187_167_744 == est.total_params
    per_layer_gpu = layer_sharded // 2 + layer_replicated  # TP 2 = 7,604,224
    first_stage = 4 * per_layer_gpu + Vp * h // 2  # 4 layers + half the padded embedding
    last_stage = 4 * per_layer_gpu + h + Vp * h // 2  # 4 layers + final norm + half the output layer
    P = max(first_stage, last_stage)
    assert P == 46_801_920 == est.actor.params

    # --- actor: bf16 weights, fp32 grads, Adam (8) + fp32 master (4) over DP = 2 ----------------
    assert est.actor.weights == 2 * P == 93_603_840
    assert est.actor.grads == 4 * P == 187_207_680
    assert est.actor.optimizer == 12 * P / 2 == 280_811_520
    # per layer and token on one TP rank (bf16, TP 2, no sequence parallelism): full width, the two
    # norms' inputs + the QKV and fc1 inputs (4 x 2h), their fp32 statistics (2 x 8), RoPE cos/sin
    # (4 x head_dim x 2); split over TP: fused QKV output (q + 2kv), attention output (q), lse
    # (16 heads x 4), Q and K after RoPE (q + kv), and the MLP's 5 ffn widths, all x 2 bytes
    full = 4 * 2 * h + 2 * 8 + 4 * 64 * 2
    split = 2 * (q + 2 * kv) + 2 * q + 16 * 4 + 2 * (q + kv) + 2 * 5 * ffn
    layer = full + split / 2
    assert layer == 33_072
    s, mb = 2048, 2
    tokens = s * mb  # padded: rows x the padded length
    act_first = 4 * 2 * layer * tokens  # 4 layers x 2 micro-batches in flight (1F1B, PP 2)
    logits = tokens * Vp / 2 * 2  # [tokens, vocab / TP] in bf16
    head = tokens * (2 * 2 * h + 8)  # final norm and output layer inputs
    temps = 3 * 256 * 2**20  # log-prob chunk temporaries
    act_last = 4 * layer * tokens + head + logits + logits + temps  # the logits and their gradient
    assert est.actor.activations == max(act_first, act_last) == 1_626_112_000

    # --- critic: value head (h params) instead of the output layer; first stage is the larger --
    Pc = max(first_stage, 4 * per_layer_gpu + h + h + 1)  # final norm, value head with its bias
    assert Pc == 46_800_896 == est.critic.params
    assert (est.critic.weights, est.critic.grads, est.critic.optimizer) == (2 * Pc, 4 * Pc, 6 * Pc)
    assert est.critic.activations == max(act_first, 4 * layer * tokens + head) == 1_083_703_296

    # --- old log-probs: forward only, 2 rows: the logits twice (megatron's [s, b] -> [b, s] copy),
    # the chunk temporaries and one layer's intermediates
    assert est.micro_batch_bytes["old log-probs"] == 2 * logits + temps + layer * tokens == 1_202_913_280
    assert "ref log-probs" in est.micro_batch_bytes and est.micro_batch_bytes["actor train"] == est.actor.activations

    # --- reference: weights only -------------------------------------------------------------
    assert (est.ref.weights, est.ref.grads, est.ref.optimizer, est.ref.activations) == (2 * P, 0, 0, 0)

    # --- vLLM: 0.5 x 80 GiB; weights / rollout TP; 1.5 GiB non-KV; the rest is KV cache ------
    budget = 40 * GiB
    vllm_weights = total * 2 / 2
    kv_bytes = budget - vllm_weights - 1.5 * GiB
    kv_per_token = 2 * L * (4 // 2) * 64 * 2  # K and V, 2 of 4 KV heads per rank, head_dim 64, bf16
    assert (est.vllm_budget, est.vllm_weights, est.vllm_kv, est.kv_bytes_per_token) == (
        budget, vllm_weights, kv_bytes, kv_per_token)
    assert est.kv_tokens == int(kv_bytes // kv_per_token) == 10_046_848
    assert est.seqs_per_engine == 64 * 4 / (8 / 2) == 64

    # --- phases: everything stays resident (no offload), vLLM sleeps while Megatron trains ----
    actor_states, critic_states, ref_states = 12 * P, 12 * Pc, 2 * P  # weights 2 + grads 4 + optimizer 6
    assert actor_states == est.actor.weights + est.actor.grads + est.actor.optimizer
    overhead = 1.5 * GiB
    assert est.phases["rollout"] == overhead + actor_states + critic_states + ref_states + budget
    states = actor_states + critic_states + ref_states
    assert est.phases["actor train"] == overhead + states + 1_626_112_000
    assert est.phases["critic train"] == overhead + states + 1_083_703_296
    assert est.phases["old log-probs"] == est.phases["ref log-probs"] == overhead + states + 1_202_913_280
    assert est.peak == est.phases["rollout"] and est.peak_phase == "rollout" and est.fits
    assert est.peak / GiB == pytest.approx(42.633, abs=1e-3)


def test_distopt_grpo_cache_and_sleep_change_what_they_should():
    spec = arch_from_hf_config(CFG)
    base = dict(gpus_per_node=8, tp=2, rollout_tp=2)
    est = estimate_memory(spec, inputs(**base))
    dist_opt = estimate_memory(spec, inputs(**base, distributed_optimizer=True))
    assert dist_opt.actor.optimizer * 4 == est.actor.optimizer  # sharded over DP = 4
    grpo = estimate_memory(spec, inputs(**base, critic=False))
    assert grpo.critic is None and "critic train" not in grpo.phases
    # vLLM that does not sleep keeps its whole budget through the training phases
    awake = estimate_memory(spec, inputs(**base, free_cache_engine=False))
    assert awake.phases["actor train"] == est.phases["actor train"] + est.vllm_budget
    # a fixed KV cache: the budget is weights + non-KV + the cache, whatever gpu_memory_utilization says
    fixed = estimate_memory(spec, inputs(**base, kv_cache_gib=3.0))
    assert fixed.vllm_kv == 3 * GiB and fixed.vllm_budget == fixed.vllm_weights + 1.5 * GiB + 3 * GiB
    # rollout TP above the KV head count: one KV head per rank (vLLM replicates them)
    wide = estimate_memory(spec, inputs(gpus_per_node=8, tp=8, rollout_tp=8))
    assert wide.kv_bytes_per_token == 2 * 8 * 1 * 64 * 2


def test_packed_micro_batches_are_sized_by_the_token_budget():
    """use_dynamic_bsz: every pass's micro-batch holds up to its budget of tokens, whatever the
    sequence length or row counts; the forward-only logits are one row, so never copied."""
    spec = arch_from_hf_config(CFG)
    base = dict(gpus_per_node=8, tp=2, pp=2, rollout_tp=2, critic=True, ref=True)
    padded = estimate_memory(spec, inputs(**base, micro_batch=2, critic_micro_batch=2, max_response_length=1536))
    packed = dict(base, dynamic_bsz=True, ppo_max_token_len=4096, critic_max_token_len=4096,
                  log_prob_max_token_len=4096, ref_log_prob_max_token_len=8192)
    est = estimate_memory(spec, inputs(**packed, max_response_length=1536))
    # the same 4096 tokens per training micro-batch as 2 padded rows of 2048
    assert est.actor.activations == padded.actor.activations and est.critic.activations == padded.critic.activations
    # the sequence length and the row counts no longer matter, the budgets do
    longer = estimate_memory(spec, inputs(**packed, max_response_length=3584, micro_batch=64, log_prob_micro_batch=64))
    assert longer.micro_batch_bytes == est.micro_batch_bytes
    bigger = estimate_memory(spec, inputs(**{**packed, "ppo_max_token_len": 8192}, max_response_length=1536))
    assert bigger.actor.activations > est.actor.activations and bigger.critic.activations == est.critic.activations
    # forward-only: one copy of the logits when packed, two for padded rows
    logits, temps = 4096 * 32000 / 2 * 2, 3 * 256 * 2**20
    assert padded.micro_batch_bytes["old log-probs"] - est.micro_batch_bytes["old log-probs"] == logits
    assert est.micro_batch_bytes["ref log-probs"] - temps == 2 * (est.micro_batch_bytes["old log-probs"] - temps)
    # PP 2: the first stage holds 2 micro-batches of up to the budget in flight
    no_logits = saved_activation_bytes(spec, 4096, 4, 2, 2, None)
    assert est.critic.activations == 2 * no_logits


def test_logprob_chunk_constant_is_the_trainers():
    from mcore_rl.models.forward import CHUNK_BYTES

    assert memory.LOGPROB_CHUNK_BYTES == CHUNK_BYTES


# --------------------------------------------------------------- activations against reality
def _saved_bytes_worker(cfgs):
    """Bytes autograd saves for backward (unique storages, parameters excluded) in one forward of
    the actor's loss (log-prob + entropy) on a padded and a packed micro-batch, bf16, at TP 1 and 2."""
    from types import SimpleNamespace

    import torch

    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.build import build_model
    from mcore_rl.models.forward import vocab_parallel_logprobs
    from mcore_rl.trainer.packing import pack_rows

    lens = [40, 96, 56, 17]
    out = {}
    for tp in (2, 1):
        init_distributed(tp, 1)
        for name, cfg in cfgs.items():
            spec = arch_from_hf_config(cfg)
            torch.manual_seed(0)
            model = build_model(spec, "actor", dtype=torch.bfloat16)
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            ids = torch.randint(0, spec.vocab_size, (2, 96))
            rows = SimpleNamespace(input_ids=torch.randint(0, spec.vocab_size, (4, 96)),
                                   prompt_length=torch.tensor([8, 16, 8, 4]),
                                   response_length=torch.tensor(lens) - torch.tensor([8, 16, 8, 4]))
            mbs = {"padded": {"input_ids": ids, "position_ids": torch.arange(96)[None].expand(2, 96)},
                   "packed": pack_rows(rows, range(4), [], "cpu", spec.position_offset)}
            for kind, mb in mbs.items():
                seen = {}

                def keep(t):
                    st = t.untyped_storage()
                    if st.data_ptr() not in params:
                        seen[st.data_ptr()] = st.nbytes()
                    return t

                x = mb["input_ids"]
                with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                    logits = model(x, mb["position_ids"], None, packed_seq_params=mb.get("packed_seq_params"))
                    logp, ent = vocab_parallel_logprobs(logits[:, :-1], x[:, 1:], spec.vocab_size, True)
                (logp.sum() + ent.sum()).backward()
                out[(name, tp, kind)] = (x.numel(), sum(seen.values()))
    return out


SAVED_CFGS = {
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512,
                  tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1000,
                  max_position_embeddings=512, tie_word_embeddings=True),
    "opt": dict(architectures=["OPTForCausalLM"], hidden_size=128, ffn_dim=352, word_embed_proj_dim=128,
                num_hidden_layers=2, num_attention_heads=4, vocab_size=1000, max_position_embeddings=512,
                do_layer_norm_before=True, activation_function="relu", enable_bias=True),
}


def test_activation_estimate_matches_what_autograd_saves(two_ranks):
    """plan's saved-activation term against the bytes autograd really keeps for a real megatron-core
    forward (saved-tensor hooks), padded and packed, TP 1 and 2, RMSNorm / LayerNorm, Q/K norms.

    Stated difference: the estimate is for CUDA, whose fused RMSNorm keeps its input (b bytes a
    value) and an fp32 statistic; CPU torch's RMSNorm is composite and keeps an fp32 copy of its
    input and its fp32 normalized output (8 bytes a value); the expected CPU bytes add that. On
    top, CPU packed attention keeps one SDPA output per sequence and their concatenation (one more
    attention-output copy); so the estimate must be within 10% below to 3% above what is saved."""
    per_rank = two_ranks["saved"]
    assert per_rank[0] == per_rank[1]
    for (name, tp, kind), (tokens, measured) in per_rank[0].items():
        spec = arch_from_hf_config(SAVED_CFGS[name])
        est = saved_activation_bytes(spec, tokens, spec.num_layers, tp, 2, "logits")
        rms_width = 0
        if spec.normalization == "RMSNorm":
            rms_width = spec.hidden_size * (2 * spec.num_layers + 1)
            if spec.qk_layernorm:
                rms_width += spec.num_layers * (spec.num_attention_heads + spec.num_query_groups) * spec.head_dim / tp
        cpu = est + tokens * (8 - 2) * rms_width
        assert 0.90 <= cpu / measured <= 1.03, (name, tp, kind, cpu, measured, cpu / measured)


def test_activation_estimate_matches_a_measured_gpu_peak():
    """The 1.5B Qwen2.5 shape, one training micro-batch of 2 x 4096 tokens with the trainer's
    log-prob, bf16, fp32 grads, Adam + fp32 master weights (benchmarks/train_step.py on an H100):
    the measured peak allocation against plan's states + activations, within 5%."""
    with open(os.path.join(REPO, "benchmarks/gpu/results/2026-11-24-h100/train_step_trainer_logprob.json")) as f:
        run = json.load(f)
    row = next(r for r in run["rows"] if r["logprob"] == "reference" and r["mbs"] == 2)
    assert (run["size"], run["dtype"], row["seq"]) == ("1.5B", "bf16", 4096)
    spec = arch_from_hf_config(_qwen25_1_5b())
    est = estimate_memory(spec, inputs(micro_batch=2, max_prompt_length=2048, max_response_length=2048, critic=False))
    assert est.total_params == run["params"]
    assert est.actor.train_total / GiB == pytest.approx(row["peak_mem_GiB"], rel=0.05)


def _qwen25_1_5b() -> dict:
    """The public Qwen2.5-1.5B config.json (the benchmarks' shape; no download)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(REPO, "benchmarks/gpu/common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.qwen25_config("1.5B")


@pytest.fixture
def qwen_1_5b_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_qwen25_1_5b()))
    return str(tmp_path)


LONG = ["configs/grpo.yaml", "actor_rollout_ref.model.dtype=bfloat16", "data.max_prompt_length=1024",
        "data.max_response_length=8192"]
PACKED = "actor_rollout_ref.actor.use_dynamic_bsz=true"


def _plan_json(capsys, *args):
    rc = plan.main([*args, "--json"])
    return rc, json.loads(capsys.readouterr().out)["estimate"]


def test_1_5b_with_8192_token_responses_fits_one_gpu_with_a_token_budget(qwen_1_5b_dir, capsys):
    """GRPO (KL loss, so a reference too) on the 1.5B shape, 1024 + 8192 tokens, one GPU."""
    model = f"actor_rollout_ref.model.path={qwen_1_5b_dir}"
    budgets = [f"{k}={{}}" for k in ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
                                    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
                                    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu")]
    # 141 GiB (H200), the default budgets of 16384 tokens
    assert plan.main([*LONG, model, PACKED, "--gpu-mem-gib", "141"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "DOES NOT FIT" not in out
    for key in ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384",
                "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=16384",
                "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=16384"):
        assert key in out
    assert "critic.ppo_max_token_len_per_gpu" not in out.split("micro-batches (packed")[1]  # GRPO: no critic
    # 80 GiB: 16384-token micro-batches do not fit, and plan names the budget to lower; 10240 fit
    rc, est = _plan_json(capsys, *LONG, model, PACKED, "--gpu-mem-gib", "80")
    assert rc == 1 and est["peak_phase"] == "actor train"
    assert any("lower actor_rollout_ref.actor.ppo_max_token_len_per_gpu" in m for m in est["problems"])
    rc, est = _plan_json(capsys, *LONG, model, PACKED, *(b.format(10240) for b in budgets), "--gpu-mem-gib", "80")
    assert rc == 0 and est["phases"]["actor train"] < 80 * GiB
    # the actor's micro-batch scales with its budget: 10240 tokens, not rows x 9216
    assert est["micro_batch_bytes"]["actor train"] < 40 * GiB


def test_1_5b_with_8192_token_responses_padded_rows_do_not_fit(qwen_1_5b_dir, capsys):
    """The same run without packing: 8 padded rows of 9216 tokens per micro-batch (the default rows)."""
    model = f"actor_rollout_ref.model.path={qwen_1_5b_dir}"
    rc, est = _plan_json(capsys, *LONG, model, "--gpu-mem-gib", "141", "actor_rollout_ref.actor.use_dynamic_bsz=false")
    assert rc == 1 and est["peak_phase"] == "actor train" and est["peak"] > 2 * 141 * GiB
    assert any("lower actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu" in m for m in est["problems"])
    assert plan.main([*LONG, model, "--gpu-mem-gib", "141", "actor_rollout_ref.actor.use_dynamic_bsz=false"]) == 1
    out = capsys.readouterr().out
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 (rows; <= 73728 tokens)" in out
    assert "DOES NOT FIT" in out


def test_split_memory_matches_hand_calculation():
    """Split placement, the hand calculation's training shape on 8 training GPUs (TP 2 x PP 2,
    DP 2) plus 4 rollout GPUs (2 engines of rollout TP 2): a training GPU holds the Megatron
    phases alone, a rollout GPU vLLM's budget alone."""
    shape = dict(tp=2, pp=2, rollout_tp=2, distributed_optimizer=True, micro_batch=2, critic_micro_batch=2,
                 max_response_length=1536, train_batch_size=64, rollout_n=4, critic=True, ref=True)
    spec = arch_from_hf_config(CFG)
    est = estimate_memory(spec, inputs(gpus_per_node=12, rollout_gpus=4, **shape))

    # the numbers of test_memory_matches_hand_calculation: P, Pc, the micro-batches' bytes
    P, Pc = 46_801_920, 46_800_896
    act_actor, act_critic, old_logprobs = 1_626_112_000, 1_083_703_296, 1_202_913_280
    assert (est.actor.params, est.critic.params) == (P, Pc)
    assert est.actor.optimizer == 12 * P / 2 and est.critic.optimizer == 12 * Pc / 2  # DP 2: the training GPUs'
    overhead, states = 1.5 * GiB, 12 * P + 12 * Pc + 2 * P
    assert est.phases == {"old log-probs": overhead + states + old_logprobs,
                          "ref log-probs": overhead + states + old_logprobs,
                          "actor train": overhead + states + act_actor,
                          "critic train": overhead + states + act_critic}  # no rollout phase, no vLLM
    assert est.peak == overhead + states + act_actor and est.peak_phase == "actor train"
    assert est.peak / GiB == pytest.approx(4.148, abs=1e-3)
    # a rollout GPU: 1.5 GiB overhead + 0.5 x 80 GiB; 64 prompts x 4 samples over 4 / 2 = 2 engines
    assert est.rollout_gpu_phases == {"rollout": 1.5 * GiB + 40 * GiB} and est.rollout_gpu_peak == 41.5 * GiB
    assert est.vllm_budget == 40 * GiB and est.vllm_weights == 187_167_744 * 2 / 2
    assert est.seqs_per_engine == 64 * 4 / 2 and est.fits
    # vLLM that never sleeps stays on its own GPUs: the training phases do not change
    awake = estimate_memory(spec, inputs(gpus_per_node=12, rollout_gpus=4, free_cache_engine=False, **shape))
    assert awake.phases == est.phases and awake.rollout_gpu_peak == est.rollout_gpu_peak


def test_split_fits_only_when_both_sides_fit():
    spec = arch_from_hf_config(CFG)
    base = dict(gpus_per_node=3, rollout_gpus=1, micro_batch=2)
    est = estimate_memory(spec, inputs(**base))
    assert est.fits and est.peak < 0.5 * 80 * GiB < est.rollout_gpu_peak
    greedy = estimate_memory(spec, inputs(**base, gpu_memory_utilization=0.99))  # 79.2 + 1.5 GiB > 80
    assert greedy.phases == est.phases and not greedy.fits
    assert greedy.problems == ["rollout GPUs need 80.7 GiB (vLLM's budget + 1.5 GiB overhead) > 80 GiB: "
                               "lower actor_rollout_ref.rollout.gpu_memory_utilization"]
    # a GPU just below the training peak, with a KV cache small enough for the rollout side
    gpu = est.peak / GiB - 0.01
    small = estimate_memory(spec, inputs(**base, gpu_mem_gib=gpu, kv_cache_gib=0.1))
    assert small.rollout_gpu_peak < gpu * GiB < small.peak and not small.fits
    assert len(small.problems) == 1 and "per training GPU" in small.problems[0]


SPLIT = ["actor_rollout_ref.rollout.placement=split"]


def test_cli_split_layout_a_line_per_side(capsys):
    assert plan.main(["configs/toy_grpo.yaml", "--gpus-per-node", "3", *SPLIT,
                      "actor_rollout_ref.rollout.n_gpus=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "layout: split placement, 3 ranks; 1 node(s) x 3 rank(s)",
        "  training ranks [0,1]: tp 1 x cp 1 x dp 2 x pp 1 (order tp-cp-ep-dp-pp)",
        "  rollout ranks [2]: 1 engine(s) of tp 1: [2]",
        "node 0: ranks [0-2] | TP [0] [1] | PP [0] [1] | DP [0,1] | rollout TP [2]",
    ]
    assert "  phases, rollout GPUs (rank 2; vLLM's budget + fixed overhead): rollout 41.50" in lines
    assert lines[-1].startswith("peak: training GPUs ") and lines[-1].endswith(
        " GiB (actor train), rollout GPUs 41.50 GiB, of 80 GiB each: FITS")
    phases = next(ln for ln in lines if ln.startswith("  phases, training GPUs (ranks 0-1): "))
    assert "rollout" not in phases and "actor train" in phases

    # two nodes: the first trains (TP 2, DP 2), the second holds two engines of rollout TP 2
    assert plan.main(["configs/toy_grpo.yaml", "--nodes", "2", "--gpus-per-node", "4", *SPLIT,
                      "actor_rollout_ref.rollout.n_gpus=4", "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
                      "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"]) == 0
    assert capsys.readouterr().out.splitlines()[:5] == [
        "layout: split placement, 8 ranks; 2 node(s) x 4 rank(s)",
        "  training ranks [0-3]: tp 2 x cp 1 x dp 2 x pp 1 (order tp-cp-ep-dp-pp)",
        "  rollout ranks [4-7]: 2 engine(s) of tp 2: [4,5] [6,7]",
        "node 0: ranks [0-3] | TP [0,1] [2,3] | PP [0] [1] [2] [3] | DP [0,2] [1,3]",
        "node 1: ranks [4-7] | rollout TP [4,5] [6,7]",
    ]


def test_cli_split_json_reports_both_sides(capsys):
    assert plan.main(["configs/toy_grpo.yaml", "--json", "--gpus-per-node", "4", *SPLIT,
                      "actor_rollout_ref.rollout.n_gpus=2",
                      "actor_rollout_ref.rollout.gpu_memory_utilization=0.3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layout"] == {"placement": "split", "train_ranks": [0, 1], "rollout_ranks": [2, 3],
                             "tp_groups": [[0], [1]], "pp_groups": [[0], [1]], "dp_groups": [[0, 1]],
                             "rollout_groups": [[2], [3]]}
    assert doc["inputs"]["rollout_gpus"] == 2
    est = doc["estimate"]
    assert "rollout" not in est["phases"] and est["peak"] == max(est["phases"].values()) < 0.3 * 80 * GiB
    assert est["rollout_gpu_phases"] == {"rollout": (1.5 + 0.3 * 80) * GiB} and est["fits"]
    assert est["seqs_per_engine"] == 16 * 8 / 2  # configs/toy_grpo.yaml: 16 prompts x 8 samples, 2 engines


def test_does_not_fit_is_reported():
    est = estimate_memory(arch_from_hf_config(CFG), inputs(gpu_mem_gib=2))
    assert not est.fits and any("vLLM budget" in m for m in est.problems)


def test_cli_prints_layout_and_estimate(model_dir, capsys):
    rc = plan.main([f"actor_rollout_ref.model.path={model_dir}", "--nodes", "2", "--gpus-per-node", "4",
                    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
                    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
                    "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4",
                    "actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.model.dtype=bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "world=8 = tp 2 x cp 1 x dp 2 x pp 2" in out
    assert sum(ln.startswith("node ") for ln in out.splitlines()) == 2
    assert "no critic" in out and "ref " in out and "FITS" in out


def test_cli_reads_the_trainers_defaults_and_keys(model_dir, capsys):
    """Every input comes from the trainer's config: its defaults where nothing is said, its keys otherwise."""
    from mcore_rl.config import load_config

    assert plan.main([f"actor_rollout_ref.model.path={model_dir}", "--json"]) == 0
    inp = json.loads(capsys.readouterr().out)["inputs"]
    d = load_config(None, [f"actor_rollout_ref.model.path={model_dir}"], world_size=1)
    a = d.actor_rollout_ref
    assert inp == dict(
        nodes=1, gpus_per_node=1, gpu_mem_gib=80.0, dtype_bytes={"float32": 4}[a.model.dtype], tp=1, pp=1, rollout_tp=1,
        gpu_memory_utilization=a.rollout.gpu_memory_utilization, kv_cache_gib=None, free_cache_engine=True,
        rollout_n=a.rollout.n, distributed_optimizer=a.actor.use_distributed_optimizer,
        micro_batch=a.actor.ppo_micro_batch_size_per_gpu, critic_micro_batch=d.critic.ppo_micro_batch_size_per_gpu,
        max_prompt_length=d.data.max_prompt_length, max_response_length=d.data.max_response_length,
        train_batch_size=d.data.train_batch_size, critic=True, ref=True,  # the toy preset: GAE, KL in the reward
        log_prob_micro_batch=a.rollout.log_prob_micro_batch_size_per_gpu,
        ref_log_prob_micro_batch=a.ref.log_prob_micro_batch_size_per_gpu, dynamic_bsz=a.actor.use_dynamic_bsz,
        ppo_max_token_len=a.actor.ppo_max_token_len_per_gpu,
        log_prob_max_token_len=a.rollout.log_prob_max_token_len_per_gpu,
        ref_log_prob_max_token_len=a.ref.log_prob_max_token_len_per_gpu,
        critic_max_token_len=d.critic.ppo_max_token_len_per_gpu, rollout_gpus=0, lora_rank=a.model.lora_rank,
        lora_targets=[])

    rc = plan.main([f"actor_rollout_ref.model.path={model_dir}", "--json", "trainer.nnodes=1",
                    "trainer.n_gpus_per_node=4", "actor_rollout_ref.rollout.tensor_model_parallel_size=4",
                    "actor_rollout_ref.rollout.gpu_memory_utilization=0.6", "actor_rollout_ref.model.dtype=float32",
                    "actor_rollout_ref.actor.use_distributed_optimizer=true",
                    "actor_rollout_ref.rollout.free_cache_engine=false", "actor_rollout_ref.actor.use_dynamic_bsz=false",
                    "data.max_prompt_length=100", "data.max_response_length=28"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    inp = doc["inputs"]
    assert (inp["nodes"], inp["gpus_per_node"], inp["rollout_tp"], inp["dtype_bytes"]) == (1, 4, 4, 4)
    assert inp["distributed_optimizer"] is True and inp["gpu_memory_utilization"] == 0.6
    assert inp["free_cache_engine"] is False
    assert doc["estimate"]["seq_len"] == 128 and doc["layout"]["rollout_groups"] == [[0, 1, 2, 3]]
    # fp32 params: no separate master copy, Adam states only, sharded over DP = 4
    assert doc["estimate"]["actor"]["optimizer"] == 8 * doc["estimate"]["actor"]["params"] / 4


def test_cli_with_no_model_plans_the_toy_default(tmp_path, capsys):
    """No model path: the toy model that `mcore-rl train` builds, read from the same sizes."""
    from mcore_rl.toy import build_toy_model

    assert plan.main(["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    built = arch_from_hf_config(build_toy_model(tmp_path / "toy"))
    assert doc["estimate"]["total_params"] == built.num_params()
    assert doc["inputs"]["train_batch_size"] == 128 and doc["estimate"]["seq_len"] == 16  # configs/toy.yaml
    assert plan.main(["configs/toy_grpo.yaml"]) == 0
    assert "no critic" in capsys.readouterr().out


def test_cli_fits_the_batch_sizes_as_the_trainer_does(capsys):
    assert plan.main(["data.train_batch_size=4", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["inputs"]["micro_batch"] == 4 and "ppo_mini_batch_size=4 (was 32)" in captured.err


def test_cli_exits_1_when_it_does_not_fit(model_dir, capsys):
    assert plan.main([f"actor_rollout_ref.model.path={model_dir}", "--gpu-mem-gib", "2"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan.main([f"actor_rollout_ref.model.path={model_dir}", "--gpu-mem-gib", "2", "--json"]) == 1


@pytest.mark.parametrize("args, msg", [
    (["data.dataset_name=x.jsonl"], "actor_rollout_ref.model.path is required"),
    (["actor_rollout_ref.model.path=/nonexistent"], "no config.json"),
    (["MODEL", "--gpus-per-node", "6", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=4"], "not divisible"),
    (["MODEL", "--gpus-per-node", "4", "actor_rollout_ref.rollout.tensor_model_parallel_size=3"],
     "world size 4 is not divisible by rollout TP=3"),
    (["MODEL", "actor_rollout_ref.model.dtype=bf16"], "must be one of float32, bfloat16, float16"),
    (["MODEL", "critic.megatron.tensor_model_parallel_size=2"], "unknown config key 'critic.megatron'"),
    (["MODEL", "actor_rollout_ref.actor.megatron.use_distributed_optimizer=true"],
     "unknown config key 'actor_rollout_ref.actor.megatron.use_distributed_optimizer'"),
    (["MODEL", "data.train_batch_size=0"], "data.train_batch_size=0: must be an integer >= 1"),
    (["MODEL", "--gpus-per-node", "3", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=3",
      "data.train_batch_size=48", "actor_rollout_ref.actor.ppo_mini_batch_size=48"],
     "num_attention_heads=16 is not divisible by TP=3"),
    (["MODEL", "trainer.nnodes=2", "trainer.n_gpus_per_node=4", "--nodes", "1"], "!= 4 ranks started"),
    (["MODEL", "--nodes", "0"], "--nodes and --gpus-per-node must be >= 1"),
    (["no/such/preset.yaml"], "config file no/such/preset.yaml not found"),
])
def test_cli_errors(model_dir, capsys, args, msg):
    args = [f"actor_rollout_ref.model.path={model_dir}" if a == "MODEL" else a for a in args]
    assert plan.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # a note on fitted sizes may come first
    assert last.startswith("mcore-rl plan: error: ") and msg in last, last


@pytest.mark.parametrize("arch, overrides, msg", [
    ("llama", {"attention_bias": True}, "attention_bias=true is not supported"),
    ("opt", {"word_embed_proj_dim": 32}, "word_embed_proj_dim != hidden_size"),
])
def test_cli_refuses_what_the_trainer_cannot_build(tmp_path, capsys, arch, overrides, msg):
    from conftest import tiny_hf_config

    tiny_hf_config(arch, **overrides).save_pretrained(tmp_path)
    assert plan.main([f"actor_rollout_ref.model.path={tmp_path}"]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("arch, targets", [("llama", "all-linear"), ("llama", "q_proj,v_proj,down_proj"),
                                           ("opt", "all-linear"), ("qwen2", "k_proj,o_proj,gate_proj")])
def test_lora_params_match_peft(arch, targets):
    """The plan's adapter count at TP=1 is peft's trainable count on the HF model; at TP=2 each GPU
    holds the replicated halves whole and the split halves halved."""
    import peft
    import torch
    import transformers as tf

    from conftest import tiny_hf_config
    from mcore_rl.models.lora import resolve_targets

    cfg = tiny_hf_config(arch)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    names = targets if targets == "all-linear" else targets.split(",")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=names))
    spec = arch_from_hf_config(cfg.to_dict())
    got = memory.lora_params_per_gpu(spec, 4, resolve_targets(targets, spec), 1, 1)
    assert got == pm.get_nb_trainable_parameters()[0]
    split = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and (
        (".lora_B." in n) != any(m in n for m in ("o_proj", "out_proj", "down_proj", "fc2"))))
    assert memory.lora_params_per_gpu(spec, 4, resolve_targets(targets, spec), 2, 1) == got - split // 2


def test_lora_plan_keeps_optimizer_state_for_adapters_only(model_dir, capsys):
    spec = arch_from_hf_config(CFG)
    full = estimate_memory(spec, inputs(gpus_per_node=2, tp=2, rollout_tp=2, critic=False, ref=True))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora = estimate_memory(spec, inputs(gpus_per_node=2, tp=2, rollout_tp=2, critic=False, ref=True, lora_rank=8,
                                        lora_targets=targets))
    n = memory.lora_params_per_gpu(spec, 8, targets, 2, 1)
    assert lora.actor.params == full.actor.params + n and lora.actor.weights == lora.actor.params * 2
    assert lora.actor.grads == n * 4 and lora.actor.optimizer == n * 12  # fp32 grads; Adam + fp32 master
    assert lora.ref is None and full.ref is not None  # the reference is the actor with its adapters off
    assert lora.actor.activations == full.actor.activations
    rc = plan.main([f"actor_rollout_ref.model.path={model_dir}", "--gpus-per-node", "2",
                    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2", "algorithm.adv_estimator=grpo",
                    "actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.model.dtype=bfloat16",
                    "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.model.lora_rank=8"])
    out = capsys.readouterr().out
    assert rc == 0 and "actor  tp2 pp1 lora8" in out and "the actor with its LoRA adapters off" in out, out
