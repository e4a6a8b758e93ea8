"""Megatron models against HuggingFace: logits, and a train step's loss and gradients at
TP=1, TP=2, PP=2, DP=2 (gloo). The reference is the HF model and PyTorch autograd."""

import pytest
import torch

from dist_utils import run_ranks

pytestmark = pytest.mark.convert
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "opt", "llama3-rope"]
LLAMA3_ROPE = dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})


def _mcore(hf_path, tp=1, pp=1, role="actor"):
    from converters.hf_io import load_hf_into_model
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model

    init_distributed(tp, pp)
    spec = arch_from_hf_config(hf_path)
    model = build_model(spec, role=role)
    load_hf_into_model(model, spec, hf_path)
    return spec, model


def _hf(hf_path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32, attn_implementation="eager")


def _logits_worker(hf_path, ids):
    from mcore_rl.models.forward import run_microbatches

    spec, model = _mcore(hf_path)
    out = run_microbatches(model, [{"input_ids": ids}], lambda o, mb: (o.sum() * 0, {"logits": o[..., :spec.vocab_size]}),
                           forward_only=True)
    return out[0]["logits"]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_vs_megatron_logits(arch, tiny_model_factory):
    path = tiny_model_factory("llama", **LLAMA3_ROPE) if arch == "llama3-rope" else tiny_model_factory(arch)
    ids = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _hf(path)(ids).logits
    got = run_ranks(_logits_worker, 1, path, ids)[0]
    diff = (got - ref).abs().max().item()
    assert ref.abs().mean() > 0.1  # non-trivial logits
    assert diff < 1e-4, f"{arch}: max abs diff {diff}"


def _train_step_worker(hf_path, ids, tp, pp):
    from megatron.core import parallel_state as ps

    from mcore_rl.models.forward import run_microbatches, vocab_parallel_logprobs
    from mcore_rl.models.optim import wrap_for_training
    from mcore_rl.resharding.gather import iter_hf_tensors

    spec, model = _mcore(hf_path, tp, pp)
    ddp, _ = wrap_for_training(model)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n_tokens = ids.size(0) * (ids.size(1) - 1)
    local = ids.chunk(dp)[dp_rank]
    mbs = [{"input_ids": x} for x in local.chunk(2)]

    def loss_fn(logits, mb):
        logp, _ = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], spec.vocab_size)
        loss = -logp.sum() / n_tokens
        return loss, {"loss": loss}

    out = run_microbatches(ddp, mbs, loss_fn)
    loss = torch.stack([o["loss"] for o in out]).sum()
    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
    grads = {k: v.clone() for k, v in iter_hf_tensors(ddp, source="grad")}
    return loss.item(), grads


@pytest.mark.parametrize("arch,tp,pp", [("llama", 1, 1), ("llama", 2, 1), ("llama", 1, 2), ("llama", 1, 1, ),
                                        ("qwen2", 2, 1), ("qwen2", 1, 2), ("opt", 2, 1)],
                         ids=["llama-tp1", "llama-tp2", "llama-pp2", "llama-dp2", "qwen2tied-tp2", "qwen2tied-pp2", "opt-tp2"])
def test_train_step_matches_hf(arch, tp, pp, tiny_model_factory, request):
    world = 2 if request.node.callspec.id != "llama-tp1" else 1
    path = tiny_model_factory(arch)
    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(1))
    hf = _hf(path)
    logits = hf(ids).logits
    ref_loss = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in hf.named_parameters()}
    results = run_ranks(_train_step_worker, world, path, ids, tp, pp)
    for loss, grads in results:
        assert abs(loss - ref_loss.item()) < 1e-5
        assert set(grads) == {n for n in ref_grads if not (n == "lm_head.weight" and hf.config.tie_word_embeddings)}
        for name, g in grads.items():
            err = (g - ref_grads[name]).abs().max().item()
            assert err < 1e-5 * max(1.0, ref_grads[name].abs().max().item()), f"{name}: grad diff {err}"
