"""`mcore-rl plan`: parameter counts against HF and megatron-core models, memory numbers against a
hand calculation, and the command line reading the trainer's config."""

import json

import pytest

from mcore_rl import plan
from mcore_rl.models.arch import arch_from_hf_config
from mcore_rl.plan import GiB, PlanInputs, count_params, estimate_memory, params_per_gpu

# A small Llama-shaped model with round numbers; vocab 31990 pads to 32000.
CFG = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
       "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 31990, "tie_word_embeddings": False,
       "max_position_embeddings": 4096}
# The inputs of the hand calculation: what each test does not set.
BASE = dict(nodes=1, gpus_per_node=1, gpu_mem_gib=80, dtype_bytes=2, tp=1, pp=1, rollout_tp=1,
            gpu_memory_utilization=0.5, kv_cache_gib=None, free_cache_engine=True, rollout_n=1,
            distributed_optimizer=False, micro_batch=1, critic_micro_batch=1, max_prompt_length=512,
            max_response_length=512, train_batch_size=16, critic=True, ref=False)


def inputs(**kw) -> PlanInputs:
    return PlanInputs(**{**BASE, **kw})


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


def test_params_per_gpu_match_megatron_at_tp2(tiny_model_factory):
    """The planner's per-GPU count is what megatron-core allocates, padded vocab included: 300 tokens pad
    to 384 (a multiple of 128, whatever TP), not to 512 (a multiple of 128 x TP)."""
    from dist_utils import run_ranks

    path = tiny_model_factory("llama", vocab_size=300)
    spec = arch_from_hf_config(path)
    assert spec.padded_vocab_size == 384
    per_rank = run_ranks(_megatron_params_worker, 2, path)
    pc = count_params(spec)
    assert per_rank[0] == per_rank[1] == [params_per_gpu(pc, spec, 2, 1), params_per_gpu(pc, spec, 2, 1, value_head=True)]


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
    s, mb = 2048, 2
    act_layer = 34 * s * mb * h / 2  # 71,303,168 per layer per micro-batch
    act_first = 4 * 2 * act_layer  # 4 layers x 2 micro-batches in flight (1F1B, PP 2)
    act_last = 4 * act_layer + 2 * 4 * s * mb * Vp / 2  # one micro-batch + fp32 logits and grad
    assert est.actor.activations == max(act_first, act_last) == 809_500_672

    # --- critic: value head (h params) instead of the output layer; first stage is the larger --
    Pc = max(first_stage, 4 * per_layer_gpu + h + h + 1)  # final norm, value head with its bias
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
        train_batch_size=d.data.train_batch_size, critic=True, ref=True)  # the toy preset: GAE, KL in the reward

    rc = plan.main([f"actor_rollout_ref.model.path={model_dir}", "--json", "trainer.nnodes=1",
                    "trainer.n_gpus_per_node=4", "actor_rollout_ref.rollout.tensor_model_parallel_size=4",
                    "actor_rollout_ref.rollout.gpu_memory_utilization=0.6", "actor_rollout_ref.model.dtype=float32",
                    "actor_rollout_ref.actor.use_distributed_optimizer=true",
                    "actor_rollout_ref.rollout.free_cache_engine=false",
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
