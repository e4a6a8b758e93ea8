"""`mcore-rl plan`: parameter counts against HF models, memory numbers against a hand
calculation, and the command line."""

import json

import pytest

from mcore_rl import plan
from mcore_rl.plan import GiB, PlanInputs, count_params, estimate_memory, model_shape_from_hf, padded_vocab

# A small Llama-shaped model with round numbers; vocab 31990 pads to 32000 at TP 2.
CFG = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
       "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 31990, "tie_word_embeddings": False}


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    return str(tmp_path)


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen2", {}), ("qwen2", {"tie_word_embeddings": False}), ("qwen3", {}), ("qwen3", {"attention_bias": True}),
    ("mistral", {}), ("opt", {}), ("opt", {"word_embed_proj_dim": 32}),
    ("opt", {"enable_bias": False, "do_layer_norm_before": False}),
])
def test_param_count_matches_hf(arch, overrides):
    import torch
    import transformers as tf

    from conftest import tiny_hf_config

    cfg = tiny_hf_config(arch, **overrides)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    assert count_params(model_shape_from_hf(cfg.to_dict())).total == sum(p.numel() for p in model.parameters())


def test_param_count_of_the_hand_model_matches_hf():
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{k: v for k, v in CFG.items() if k != "model_type"}))
    assert sum(p.numel() for p in model.parameters()) == 187_167_744


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="not supported"):
        model_shape_from_hf({"model_type": "gpt2"})


def test_padded_vocab():
    assert padded_vocab(31990, 2) == 32000 and padded_vocab(32000, 1) == 32000 and padded_vocab(32001, 1) == 32128


def test_memory_matches_hand_calculation():
    """8 GPUs (1 node), actor TP 2 x PP 2 (DP 2), rollout TP 2, bf16, distributed optimizer,
    micro-batch 2, sequence 512 + 1536 = 2048, GAE (critic) and a KL loss (reference)."""
    p = PlanInputs(nodes=1, gpus_per_node=8, gpu_mem_gib=80, dtype_bytes=2, tp=2, pp=2, rollout_tp=2,
                   gpu_memory_utilization=0.5, distributed_optimizer=True, micro_batch=2, max_prompt_length=512,
                   max_response_length=1536, train_batch_size=64, rollout_n=4, critic=True, critic_tp=2, critic_pp=2,
                   critic_micro_batch=2, ref=True)
    est = estimate_memory(model_shape_from_hf(CFG), p)

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
    s, mb = 2048, 2
    act_layer = 34 * s * mb * h / 2  # 71,303,168 per layer per micro-batch
    act_first = 4 * 2 * act_layer  # 4 layers x 2 micro-batches in flight (1F1B, PP 2)
    act_last = 4 * act_layer + 2 * 4 * s * mb * Vp / 2  # one micro-batch + fp32 logits and grad
    assert est.actor.activations == max(act_first, act_last) == 809_500_672

    # --- critic: value head (h params) instead of the output layer; first stage is the larger --
    Pc = max(first_stage, 4 * per_layer_gpu + h + h)
    assert Pc == 46_800_896 == est.critic.params
    assert (est.critic.weights, est.critic.grads, est.critic.optimizer) == (2 * Pc, 4 * Pc, 6 * Pc)
    assert est.critic.activations == max(act_first, 4 * act_layer) == 570_425_344

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
    assert est.phases["actor train"] == overhead + actor_states + 809_500_672 + critic_states + ref_states
    assert est.phases["critic train"] == overhead + critic_states + 570_425_344 + actor_states + ref_states
    assert est.peak == est.phases["rollout"] and est.fits and est.peak / GiB == pytest.approx(42.633, abs=1e-3)


def test_offload_distopt_and_grpo_change_what_they_should():
    shape = model_shape_from_hf(CFG)
    base = dict(nodes=1, gpus_per_node=8, tp=2, pp=1, rollout_tp=2)
    est = estimate_memory(shape, PlanInputs(**base))
    off = estimate_memory(shape, PlanInputs(**base, actor_offload=(True, True, True), critic_offload=(True, True, True)))
    assert off.phases["rollout"] < est.phases["rollout"]
    assert off.actor.train_total == est.actor.train_total and off.actor.resident_in_rollout == 0
    no_dist = estimate_memory(shape, PlanInputs(**base, distributed_optimizer=False))
    assert no_dist.actor.optimizer == est.actor.optimizer * 4  # DP = 4
    grpo = estimate_memory(shape, PlanInputs(**base, critic=False))
    assert grpo.critic is None and "critic train" not in grpo.phases
    # rollout TP above the KV head count: one KV head per rank (vLLM replicates them)
    wide = estimate_memory(shape, PlanInputs(nodes=1, gpus_per_node=8, tp=8, rollout_tp=8))
    assert wide.kv_bytes_per_token == 2 * 8 * 1 * 64 * 2


def test_does_not_fit_is_reported():
    est = estimate_memory(model_shape_from_hf(CFG), PlanInputs(nodes=1, gpus_per_node=1, gpu_mem_gib=2))
    assert not est.fits and any("vLLM budget" in m for m in est.problems)


def test_cli_prints_layout_and_estimate(model_dir, capsys):
    rc = plan.main([f"actor_rollout_ref.model.path={model_dir}", "--nodes", "2", "--gpus-per-node", "4",
                    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
                    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
                    "algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.use_kl_loss=true"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "world=8 = tp 2 x cp 1 x dp 2 x pp 2" in out
    assert sum(ln.startswith("node ") for ln in out.splitlines()) == 2
    assert "no critic" in out and "ref " in out and "FITS" in out


def test_cli_json_uses_config_keys(model_dir, capsys):
    rc = plan.main([f"actor_rollout_ref.model.path={model_dir}", "--json", "trainer.nnodes=1",
                    "trainer.n_gpus_per_node=4", "actor_rollout_ref.rollout.tensor_model_parallel_size=4",
                    "actor_rollout_ref.rollout.gpu_memory_utilization=0.6", "actor_rollout_ref.model.dtype=fp32",
                    "actor_rollout_ref.actor.megatron.use_distributed_optimizer=false",
                    "data.max_prompt_length=100", "data.max_response_length=28"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    inp = doc["inputs"]
    assert (inp["nodes"], inp["gpus_per_node"], inp["rollout_tp"], inp["dtype_bytes"]) == (1, 4, 4, 4)
    assert inp["distributed_optimizer"] is False and inp["gpu_memory_utilization"] == 0.6
    assert doc["estimate"]["seq_len"] == 128 and doc["layout"]["rollout_groups"] == [[0, 1, 2, 3]]
    # fp32 params: no separate master copy, Adam states only
    assert doc["estimate"]["actor"]["optimizer"] == 8 * doc["estimate"]["actor"]["params"]


@pytest.mark.parametrize("args, msg", [
    ([], "model.path"),
    (["actor_rollout_ref.model.path=/nonexistent"], "no config.json"),
    (["MODEL", "--gpus-per-node", "6", "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=4"], "not divisible"),
    (["MODEL", "--gpus-per-node", "4", "actor_rollout_ref.rollout.tensor_model_parallel_size=3"], "does not divide"),
    (["MODEL", "actor_rollout_ref.model.dtype=int3"], "dtype"),
    (["notakeyvalue"], "key=value"),
])
def test_cli_errors(model_dir, capsys, args, msg):
    args = [f"actor_rollout_ref.model.path={model_dir}" if a == "MODEL" else a for a in args]
    assert plan.main(args) == 2
    assert msg in capsys.readouterr().err
