"""LoRA on the Megatron actor (mcore_rl/models/lora.py) against peft on the HF model.

The reference is peft's `LoraConfig` on the transformers model (fp32), with the same adapters
(random, B non-zero) loaded into both by their peft names. At TP=2 and PP=2 (gloo, 2 ranks):
logits, the adapters' gradients (gathered to peft names), the optimizer's gradient norm, and the
merged weights of `iter_hf_tensors` (against peft's `merge_and_unload`, which the rollout engine
is sent: the fast weight sync declines a LoRA model). Also: a fresh adapter
(B = 0) and disabled adapters leave the logits exactly the base model's; the initial adapters do
not depend on the layout; a distributed checkpoint written at TP=2 loads at TP=1 to the same
adapters; the optimizer holds only adapters.

And the toy GRPO task through ``mcore-rl train`` with LoRA (one process, vLLM): the reward rises,
only the adapters train, the rollout engine is given the trained (merged) policy every step, the
reference is the base model; its curve is pinned to ``tests/golden/toy_grpo_lora.jsonl`` as
tests/test_golden.py pins the others (regenerate as said there).
"""

import os
import re
import signal

import pytest
import torch

from conftest import make_tiny_hf_model
from dist_utils import in_turn, run_ranks

RANK, ALPHA, SEED = 4, 8.0, 3
IDS = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(1))
TOY_LORA = ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.actor.optim.lr=1e-2", "trainer.max_steps=6"]
CASES = {  # id: (arch, TP, PP, target_modules)
    "llama-tp2-qv": ("llama", 2, 1, "q_proj,v_proj"),
    "llama-tp2-all": ("llama", 2, 1, "all-linear"),
    "llama-pp2-all": ("llama", 1, 2, "all-linear"),
    "llama-pp2-mixed": ("llama", 1, 2, "k_proj,o_proj,up_proj,down_proj"),
    "opt-tp2-all": ("opt", 2, 1, "all-linear"),
}


def _peft_model(path, targets):
    import peft
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    names = targets if targets == "all-linear" else targets.split(",")
    return peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=names))


def _random_adapters(path, targets, seed=0) -> dict[str, torch.Tensor]:
    """Random adapters (B non-zero) in peft's saved names without ``base_model.model.``, from peft."""
    import peft

    pm = _peft_model(path, targets)
    g = torch.Generator().manual_seed(seed)
    sd = peft.get_peft_model_state_dict(pm)
    return {k.removeprefix("base_model.model."): 0.2 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def _loss(logits, ids):
    return -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()


def _peft_reference(path, targets, adapters, ids):
    """peft on the HF model: logits, the adapters' gradients (peft names), merged weights (HF names)."""
    import peft

    pm = _peft_model(path, targets)
    peft.set_peft_model_state_dict(pm, {f"base_model.model.{k}": v for k, v in adapters.items()})
    logits = pm(ids).logits
    _loss(logits, ids).backward()
    grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
             for n, p in pm.named_parameters() if p.requires_grad}
    merged = {n: p.detach() for n, p in pm.merge_and_unload().state_dict().items()}
    return logits.detach(), grads, merged


# ------------------------------------------------------------------------------ workers (gloo ranks)
def _build(path, tp, pp):
    from converters.hf_io import load_hf_into_model
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model

    init_distributed(tp, pp)
    spec = arch_from_hf_config(path)
    model = build_model(spec)
    load_hf_into_model(model, spec, path)
    return spec, model


def _logits(model, ids):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from mcore_rl.models.forward import run_microbatches

    vocab = model.mcore_rl_spec.vocab_size
    out = run_microbatches(model, [{"input_ids": ids}], forward_only=True, loss_fn=lambda o, mb: (
        o.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(o)[..., :vocab]}))
    return out[0]["logits"]


def _case_worker(path, tp, pp, targets, adapters, ids, ckpt=None):
    from converters.gather import iter_hf_tensors, iter_lora_tensors
    from mcore_rl.models import lora
    from mcore_rl.models.forward import run_microbatches, vocab_parallel_logprobs
    from mcore_rl.models.optim import wrap_for_training
    from mcore_rl.resharding.fast_path import NotApplicable, build_program

    spec, model = _build(path, tp, pp)
    out = {"base": _logits(model, ids)}
    lora.add_lora(model, lora.LoRAConfig(RANK, ALPHA, lora.resolve_targets(targets, spec)), seed=SEED)
    out["init"] = {k: v.clone() for k, v in iter_lora_tensors(model)}  # (at TP=1 some are views of the params)
    out["fresh"] = _logits(model, ids)
    lora.load_adapters(model, adapters)
    out["lora"] = _logits(model, ids)
    with lora.disabled(model):
        out["disabled"] = _logits(model, ids)
    out["merged"] = dict(iter_hf_tensors(model))
    try:  # the fast weight sync copies raw shards: not for a LoRA model
        build_program(model, None)
    except NotApplicable as e:
        out["fast_path"] = str(e)
    if ckpt:
        from converters.checkpoint import save_model

        save_model(model, ckpt)
    ddp, opt = wrap_for_training(model)
    n = ids.size(0) * (ids.size(1) - 1)

    def loss_fn(logits, mb):
        logp, _ = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], spec.vocab_size)
        return -logp.sum() / n, {}

    run_microbatches(ddp, [{"input_ids": x} for x in ids.chunk(2)], loss_fn)
    out["grads"] = {k: v.clone() for k, v in iter_lora_tensors(ddp, source="grad")}  # before the step clips them
    out["grad_norm"] = opt.step()[1]
    out["optimized"] = sorted(n for n, p in model.named_parameters() if any(
        p is q for g in opt.param_groups for q in g["params"]))
    out["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    out["n_trainable"] = lora.trainable_params(ddp)
    return out


def _load_worker(path, targets, ckpt):
    """A TP=1 (DP=2) model given the TP=2 checkpoint: its adapters, gathered."""
    from converters.checkpoint import load_model
    from converters.gather import iter_lora_tensors
    from mcore_rl.models import lora

    spec, model = _build(path, 1, 1)
    lora.add_lora(model, lora.LoRAConfig(RANK, ALPHA, lora.resolve_targets(targets, spec)), seed=SEED + 1)
    load_model(model, ckpt)
    return dict(iter_lora_tensors(model))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """``mcore-rl train configs/toy_grpo.yaml`` with LoRA, started at once (it runs while the other
    tests of the module do); calling the returned function waits: (metrics rows, console log, output dir)."""
    from test_golden import REPO, finish, start_train

    proc = start_train([str(REPO / "configs" / "toy_grpo.yaml"), *TOY_LORA], tmp_path_factory.mktemp("toy_lora"))
    yield lambda: (*finish(proc), proc.tmp / "run")
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, toy_run):
    """{case: (path, adapters, rank 0's results, rank 1's)}, all cases in one set of 2 processes; the
    TP=2 q,v case also writes a checkpoint that a TP=1 model then loads (case "load"). (Asks for
    `toy_run` only to start it first.)"""
    root = tmp_path_factory.mktemp("lora")
    cases = CASES
    paths = {arch: make_tiny_hf_model(root / arch, arch) for arch in sorted({c[0] for c in cases.values()})}
    adapters = {c: _random_adapters(paths[arch], targets) for c, (arch, _, _, targets) in cases.items()}
    ckpt = str(root / "ckpt")
    calls = {c: (_case_worker, (paths[arch], tp, pp, targets, adapters[c], IDS, ckpt if c == "llama-tp2-qv" else None))
             for c, (arch, tp, pp, targets) in cases.items()}
    calls["load"] = (_load_worker, (paths["llama"], CASES["llama-tp2-qv"][3], ckpt))
    ranks = run_ranks(in_turn, 2, calls)
    return {c: (paths[cases[c][0]] if c in cases else None, adapters.get(c), ranks[0][c], ranks[1][c]) for c in calls}


def _close(got, want, tol, what):
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max abs diff {err}"


@pytest.mark.convert
@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft(case, lora_runs):
    path, adapters, r0, r1 = lora_runs[case]
    targets = CASES[case][3]
    ref_logits, ref_grads, ref_merged = _peft_reference(path, targets, adapters, IDS)
    for r in (r0, r1):  # every rank gets the whole result
        # the adapters change the model, as peft's do
        assert (ref_logits - r["base"]).abs().max() > 1e-2
        _close(r["lora"], ref_logits, 1e-4, "logits")
        # a fresh adapter (B = 0) and disabled adapters: exactly the base model
        assert torch.equal(r["fresh"], r["base"]) and torch.equal(r["disabled"], r["base"])
        assert set(r["grads"]) == set(ref_grads) == set(adapters)
        for name, g in r["grads"].items():
            assert ref_grads[name].abs().max() > 0, name
            _close(g, ref_grads[name], 1e-5, f"grad {name}")
        ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
        assert abs(r["grad_norm"] - ref_norm) < 1e-5 * ref_norm, (r["grad_norm"], ref_norm)
        assert set(r["merged"]) <= set(ref_merged) and set(ref_merged) - set(r["merged"]) <= {"lm_head.weight"}  # tied
        for name, w in r["merged"].items():
            _close(w, ref_merged[name], 1e-6, f"merged {name}")
        # a fresh adapter: A drawn (non-zero), B zero; only adapters are trained
        for name, t in r["init"].items():
            assert (t.abs().sum() > 0) == (".lora_A." in name), name
        assert r["n_trainable"] == sum(t.numel() for t in adapters.values())  # the whole model's, counted once
        assert r["fast_path"] == "LoRA: merged weights take the HF-named path"
        assert r["optimized"] == r["trainable"] and r["trainable"] and all("_lora." in n for n in r["trainable"])


@pytest.mark.convert
def test_initial_adapters_do_not_depend_on_layout(lora_runs):
    """The same adapters at TP=2 and PP=2 (each drawn whole from its own seeded stream)."""
    tp2, pp2 = lora_runs["llama-tp2-all"][2]["init"], lora_runs["llama-pp2-all"][2]["init"]
    assert set(tp2) == set(pp2)
    for name in tp2:
        assert torch.equal(tp2[name], pp2[name]), name


@pytest.mark.convert
def test_checkpoint_tp2_loads_at_tp1(lora_runs):
    """megatron's dist checkpoint of the TP=2 model, loaded at TP=1: the same adapters (the sharded
    halves of B are whole again, A is not doubled)."""
    _, adapters, _, _ = lora_runs["llama-tp2-qv"]
    for loaded in lora_runs["load"][2:]:
        assert set(loaded) == set(adapters)
        for name, t in loaded.items():
            assert torch.equal(t, adapters[name]), name


@pytest.mark.train
def test_toy_task_learns_with_lora(toy_run, capsys):
    """The toy GRPO task with LoRA rank 8 on every linear, 6 steps (fp32, CPU vLLM, one thread)."""
    import json

    from test_golden import GOLDEN_KEYS, check_golden

    if torch.cuda.is_available():
        pytest.skip("the golden curve is the CPU run's")
    rows, log, out = toy_run()
    assert [r["step"] for r in rows] == list(range(1, 7))
    reward = [r["reward/mean"] for r in rows]
    assert (reward[4] + reward[5]) / 2 > 2 * (reward[0] + reward[1]) / 2, reward
    # only the adapters train: r * (in + out) for each linear of each layer, counted from config.json
    c = json.loads((out / "toy_model" / "config.json").read_text())
    h, f, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h)
    want = 8 * per_layer * c["num_hidden_layers"]
    assert f"LoRA rank 8, alpha 16 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: {want:,} trainable" in log
    assert "reference=the actor without LoRA" in log  # no second model
    # the engine generates with the policy being trained: its log-probs are the trainer's old log-probs
    # every step (fp32), while the policy moves away from the reference (the base: at step 1 the same)
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows), [r["rollout/logprob_diff_max"] for r in rows]
    assert rows[0]["actor/kl"] == 0.0 and rows[-1]["actor/kl"] > 0.1, [r["actor/kl"] for r in rows]
    check_golden("toy_grpo_lora", rows, GOLDEN_KEYS["grpo"], capsys)



# ------------------------------------------------------------------------------ configuration
LORA8 = "actor_rollout_ref.model.lora_rank=8"


@pytest.mark.parametrize("overrides,msg", [
    ([LORA8, "actor_rollout_ref.model.transformer_impl=transformer_engine"],
     "lora_rank=8 needs transformer_impl=local (TransformerEngine's fused layernorm-linear"),
    (["actor_rollout_ref.model.lora_rank=-1"], "lora_rank=-1: must be an integer >= 0"),
    ([LORA8, "actor_rollout_ref.model.lora_alpha=0"], "lora_alpha=0: must be a number > 0"),
    ([LORA8, "actor_rollout_ref.model.target_modules=5"],
     "target_modules=5: must be all-linear, or module names (a list, or one string separated by commas)"),
    ([LORA8, "actor_rollout_ref.model.target_modules=[]"], "target_modules is empty (lora_rank=8)"),
    ([LORA8, "actor_rollout_ref.model.target_modules=' , '"], "target_modules is empty (lora_rank=8)"),
    ([LORA8, "actor_rollout_ref.model.target_modules=all-linear,q_proj"], "all-linear goes alone"),
])
def test_bad_lora_settings_fail_at_load(overrides, msg):
    from mcore_rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(None, overrides, world_size=1)


def test_target_modules_are_the_models_linear_modules(tiny_model_factory):
    """Names as peft's (a list, or a comma-separated string), checked against the model's own linear
    modules (the converter's mapping) before any process group: an unknown one names the valid ones."""
    from mcore_rl.config import ConfigError, check_sizes, load_config
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.lora import resolve_targets

    llama, opt = (arch_from_hf_config(tiny_model_factory(a)) for a in ("llama", "opt"))
    assert resolve_targets("all-linear", llama) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj")
    assert resolve_targets("all-linear", opt) == ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    assert resolve_targets("v_proj, q_proj", llama) == resolve_targets(["q_proj", "v_proj"], llama) == ("q_proj", "v_proj")
    for targets, spec, valid in (("q_proj,o_proj", opt, "q_proj, k_proj, v_proj, out_proj, fc1, fc2"),
                                 ("[qproj]", llama, "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")):
        cfg = load_config(None, [LORA8, f"actor_rollout_ref.model.target_modules={targets}"], world_size=1)
        check_sizes(cfg, 1)  # the names are checked once the model is known
        with pytest.raises(ConfigError, match=re.escape(f"is not a linear module of this {spec.family} model; "
                                                        f"valid: all-linear or any of {valid}")):
            check_sizes(cfg, 1, spec)


def test_the_trainer_refuses_an_unknown_target_before_any_process_group(tmp_path, capsys):
    import torch.distributed as dist

    from mcore_rl.commands.train import main

    assert main([LORA8, "actor_rollout_ref.model.target_modules=q_proj,qkv_proj", f"trainer.output_dir={tmp_path}",
                 "trainer.logger=[console]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the toy model's writing progress)
    assert err == ("mcore-rl train: error: actor_rollout_ref.model.target_modules: qkv_proj is not a linear module of "
                   "this llama model; valid: all-linear or any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                   "down_proj"), err
    assert not dist.is_initialized()
