"""Megatron models against HuggingFace: logits, and a train step's loss and gradients at
TP=1, TP=2, PP=2, DP=2 (gloo). The reference is the HF model and PyTorch autograd.

The selected cases of a test that need the same number of ranks run in one set of spawned
processes, one after another (`dist_utils.in_turn`).
"""

import pytest
import torch

from conftest import make_tiny_hf_model
from dist_utils import in_turn, run_ranks, selected

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


LOGITS_IDS = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def megatron_logits(request, tmp_path_factory):
    """{arch: (checkpoint, Megatron logits)} of the selected archs, one process for all."""
    root = tmp_path_factory.mktemp("logits")
    paths = {arch: make_tiny_hf_model(root / arch, "llama", **LLAMA3_ROPE) if arch == "llama3-rope"
             else make_tiny_hf_model(root / arch, arch) for arch in
             sorted({p["arch"] for p in selected(request, "test_hf_vs_megatron_logits").values()})}
    got = run_ranks(in_turn, 1, {arch: (_logits_worker, (path, LOGITS_IDS)) for arch, path in paths.items()})[0]
    return {arch: (paths[arch], got[arch]) for arch in paths}


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_vs_megatron_logits(arch, megatron_logits):
    path, got = megatron_logits[arch]
    ids = LOGITS_IDS
    with torch.no_grad():
        ref = _hf(path)(ids).logits
    diff = (got - ref).abs().max().item()
    assert ref.abs().mean() > 0.1  # non-trivial logits
    assert diff < 1e-4, f"{arch}: max abs diff {diff}"


def _train_step_worker(hf_path, ids, tp, pp):
    from megatron.core import parallel_state as ps

    from mcore_rl.models.forward import run_microbatches, vocab_parallel_logprobs
    from mcore_rl.models.optim import wrap_for_training
    from converters.gather import iter_hf_tensors

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


STEP_IDS = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(1))


def _world(case_id):
    return 1 if case_id == "llama-tp1" else 2


@pytest.fixture(scope="module")
def train_steps(request, tmp_path_factory):
    """{case id: (checkpoint, per-rank (loss, grads))} of the selected cases; the cases of one world
    size run in one set of processes (each case sets its own TP/PP)."""
    root = tmp_path_factory.mktemp("train_step")
    cases = selected(request, "test_train_step_matches_hf")
    paths = {arch: make_tiny_hf_model(root / arch, arch) for arch in sorted({p["arch"] for p in cases.values()})}
    out = {}
    for world in sorted({_world(c) for c in cases}):
        calls = {c: (_train_step_worker, (paths[p["arch"]], STEP_IDS, p["tp"], p["pp"]))
                 for c, p in cases.items() if _world(c) == world}
        ranks = run_ranks(in_turn, world, calls)
        out.update({c: (paths[cases[c]["arch"]], [r[c] for r in ranks]) for c in calls})
    return out


@pytest.mark.parametrize("arch,tp,pp", [("llama", 1, 1), ("llama", 2, 1), ("llama", 1, 2), ("llama", 1, 1, ),
                                        ("qwen2", 2, 1), ("qwen2", 1, 2), ("opt", 2, 1)],
                         ids=["llama-tp1", "llama-tp2", "llama-pp2", "llama-dp2", "qwen2tied-tp2", "qwen2tied-pp2", "opt-tp2"])
def test_train_step_matches_hf(arch, tp, pp, train_steps, request):
    path, results = train_steps[request.node.callspec.id]
    ids = STEP_IDS
    hf = _hf(path)
    logits = hf(ids).logits
    ref_loss = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert len(results) == _world(request.node.callspec.id)
    for loss, grads in results:
        assert abs(loss - ref_loss.item()) < 1e-5
        assert set(grads) == {n for n in ref_grads if not (n == "lm_head.weight" and hf.config.tie_word_embeddings)}
        for name, g in grads.items():
            err = (g - ref_grads[name]).abs().max().item()
            assert err < 1e-5 * max(1.0, ref_grads[name].abs().max().item()), f"{name}: grad diff {err}"


def _chunked_logprob_worker(vocab_size, padded, seed):
    """Chunked (`vocab_parallel_logprobs`) vs the plain formula (`..._reference`) vs torch's
    full-vocab log_softmax, on this TP rank's shard: values and gradients of logp and entropy."""
    from megatron.core import parallel_state as ps

    from mcore_rl.distributed import init_distributed

    tp = int(__import__("os").environ["WORLD_SIZE"])
    init_distributed(tp, 1)
    return {dtype: _chunked_logprob_case(ps.get_tensor_model_parallel_rank(), tp, vocab_size, padded, dtype, seed)
            for dtype in (torch.float32, torch.bfloat16)}


def _chunked_logprob_case(rank, tp, vocab_size, padded, dtype, seed):
    from mcore_rl.models.forward import vocab_parallel_logprobs, vocab_parallel_logprobs_reference

    g = torch.Generator().manual_seed(seed)
    B, S = 3, 9
    full = (3 * torch.randn(B, S + 1, padded, generator=g)).to(dtype)  # [b, s, padded vocab], like the model's output
    full[..., vocab_size:] = 50.0  # padding logits that would dominate if they were counted
    ids = torch.randint(0, vocab_size, (B, S + 1), generator=g)
    w_lp, w_ent = torch.randn(B, S, generator=g), torch.randn(B, S, generator=g)
    vl = padded // tp
    cols = slice(rank * vl, (rank + 1) * vl)

    def run(fn, loss_terms, contiguous=False, **kw):
        shard = full[..., cols].clone().requires_grad_()
        x = shard[:, :-1]  # a non-contiguous view, as the trainer passes
        logp, ent = fn(x.contiguous() if contiguous else x, ids[:, 1:], vocab_size, True, **kw)
        loss = sum(((w_lp * logp).sum(), (w_ent * ent).sum())[i] for i in loss_terms)
        loss.backward()
        return logp.detach(), ent.detach(), shard.grad

    out = {}
    for terms in ((0, 1), (0,), (1,)):
        ref = run(vocab_parallel_logprobs_reference, terms)
        chunk = 4 * 7 * max(1, min(vl, vocab_size - rank * vl))  # 7 rows a chunk: chunks straddle sequences
        got = run(vocab_parallel_logprobs, terms, chunk_bytes=chunk)
        flat = run(vocab_parallel_logprobs, terms, contiguous=True, chunk_bytes=chunk)
        out[(terms, "flat")] = [(a.float() - b.float()).abs().max().item() for a, b in zip(got, flat)]
        # the ground truth: torch's log_softmax over the full, unpadded vocabulary
        x = full[:, :-1, :vocab_size].float().clone().requires_grad_()
        lsm = torch.log_softmax(x, -1)
        t_logp, t_ent = lsm.gather(-1, ids[:, 1:, None])[..., 0], -(lsm.exp() * lsm).sum(-1)
        sum(((w_lp * t_logp).sum(), (w_ent * t_ent).sum())[i] for i in terms).backward()
        t_grad = torch.zeros(B, S + 1, padded)  # the last position is not scored: zero gradient
        t_grad[:, :-1, :vocab_size] = x.grad
        truth = (t_logp.detach(), t_ent.detach(), t_grad[..., cols].to(dtype))
        for name, other in (("ref", ref), ("truth", truth)):
            out[(terms, name)] = [(a.float() - b.float()).abs().max().item() for a, b in zip(got, other)]
        out[(terms, "grad_scale")] = truth[2].float().abs().max().item()
        out[(terms, "pad_grad")] = got[2][..., max(0, vocab_size - rank * vl):].abs().max().item() if vocab_size < (rank + 1) * vl else 0.0
    return out


@pytest.fixture(scope="module")
def chunked_logprobs(request):
    """{case id: per-rank results} of the selected cases; the cases of one TP size in one set of processes."""
    cases = selected(request, "test_chunked_logprobs_match_plain_formula")
    out = {}
    for tp in sorted({p["tp"] for p in cases.values()}):
        calls = {c: (_chunked_logprob_worker, (p["vocab_size"], p["padded"], 0))
                 for c, p in cases.items() if p["tp"] == tp}
        ranks = run_ranks(in_turn, tp, calls)
        out.update({c: [r[c] for r in ranks] for c in calls})
    return out


@pytest.mark.parametrize("tp,vocab_size,padded", [(1, 250, 256), (2, 250, 256), (2, 100, 256)],
                         ids=["tp1", "tp2", "tp2-rank-all-padding"])
def test_chunked_logprobs_match_plain_formula(tp, vocab_size, padded, chunked_logprobs, request):
    """The trainer's chunked log-prob/entropy (several chunks, the trainer's sliced view) equals the
    plain full-size formula and torch's log_softmax, values and gradients, at TP=1 and TP=2
    (including a TP rank whose shard is all vocab padding), fp32 and bf16 logits."""
    ranks = chunked_logprobs[request.node.callspec.id]
    assert len(ranks) == tp
    for dtype, res in ((d, r) for rank in ranks for d, r in rank.items()):
        for key, errs in res.items():
            if key[1] in ("ref", "truth"):
                lp, ent, grad = errs
                assert lp < 1e-5 and ent < 1e-4, (key, errs)
                # bf16 gradients: both sides round the same fp32 value; allow one bf16 ulp of the largest
                tol = 1e-6 * max(1.0, res[(key[0], 'grad_scale')]) if dtype == torch.float32 else 2 ** -8 * res[(key[0], "grad_scale")]
                assert grad <= tol, (key, errs)
            elif key[1] == "flat":  # the contiguous-input path computes the same
                assert max(errs) < 1e-5, (key, errs)
            elif key[1] == "pad_grad":
                assert errs == 0.0, key
