"""Rollout engines: in-place weight updates, vLLM vs transformers parity, log-probs, stopping.

All comparisons run in fp32 on tiny random checkpoints. vLLM engines take seconds each on CPU,
so each architecture gets two (module-scoped, torn down before the next architecture starts):
`A` starts from checkpoint seed 0, `B` from seed 1; each serves as the "fresh engine" oracle
for the other's updates.
"""

import os
import random
import tempfile

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_hf_model
from dist_utils import free_port, run_ranks
from mcore_rl.rollout import Sampling, make_engine, model_eos_token_ids, vllm_available
from mcore_rl.rollout.base import RolloutOutput

pytestmark = pytest.mark.sync
needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")

GREEDY = Sampling(temperature=0, max_tokens=24)
MAX_MODEL_LEN = 512
# fp32 on both sides; the measured max |diff| is ~1e-6 (different GEMM / attention kernels and
# summation order). 1e-4 leaves a 100x margin yet is ~300x below what bf16 weights give (~3e-2
# on GPU), and any temperature- or top-p-processed log-prob would be off by far more.
LOGPROB_ATOL = 1e-4


def _prompts():
    """Token-id prompts; two are longer than a KV block (128 tokens on CPU) to exercise the prefix cache."""
    rng = random.Random(0)
    return [[rng.randrange(3, 250) for _ in range(n)] for n in (7, 140, 300)]


PROMPTS = _prompts()


def _stream(path, bucket=4):
    """(name, tensor) pairs read lazily from a checkpoint, in buckets, as a resharder would yield them."""
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        for i in range(0, len(names), bucket):
            for name in names[i:i + bucket]:
                yield name, f.get_tensor(name)


def _tokens(outs: list[RolloutOutput]):
    return [(o.prompt_index, o.sample_index, o.token_ids, o.finish_reason) for o in outs]


def _hf_forward_logprobs(model, prompt, completion):
    """log_softmax of a full (prompt + completion) forward at each completion token: the trainer's view."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.fixture(scope="module", autouse=True)
def _own_tmpdir(tmp_path_factory):
    """vLLM writes socket files to the temp dir: keep them in this session's own folder."""
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))
    tempfile.tempdir = None
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    tempfile.tempdir = None


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def ckpts(request, tmp_path_factory):
    """Checkpoints seed 0 and seed 1 of one architecture (qwen2: tied embeddings, no eos).

    Llama's eos is set to a token its seed-0 greedy continuation of prompt 0 produces, so that
    stopping on eos is exercised; the weights do not depend on it.
    """
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    overrides = {}
    if arch == "llama":
        import transformers as tf

        probe = make_tiny_hf_model(root / "probe", arch, seed=0)
        model = tf.AutoModelForCausalLM.from_pretrained(probe, dtype=torch.float32)
        ids = torch.tensor([PROMPTS[0]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        # a token first produced at position >= 3 (so eos ends the sample early, but not at once)
        pos = next(i for i in range(3, len(out)) if out[i] not in out[:i])
        overrides["eos_token_id"] = out[pos]
    paths = {s: make_tiny_hf_model(root / f"seed{s}", arch, seed=s, **overrides) for s in (0, 1)}
    return arch, paths


@pytest.fixture(scope="module")
def engines(ckpts):
    """vLLM engines A (seed 0) and B (seed 1), with their greedy outputs before any update."""
    _, paths = ckpts
    kw = dict(dtype="float32", kv_cache_gib_cpu=0.0625, max_model_len=MAX_MODEL_LEN, seed=0)
    dist_before = torch.distributed.is_initialized()
    a = make_engine("vllm", model_path=paths[0], **kw)
    b = make_engine("vllm", model_path=paths[1], **kw)
    print(f"\nvLLM engine start: {a.start_time_s:.1f} s (first), {b.start_time_s:.1f} s (second)")
    refs = {0: a.generate(PROMPTS, GREEDY), 1: b.generate(PROMPTS, GREEDY)}
    yield a, b, refs
    a.close()
    b.close()
    # a process group vLLM created is gone after close(), one that existed before is kept
    assert torch.distributed.is_initialized() == dist_before


@pytest.fixture(scope="module")
def hf(ckpts):
    _, paths = ckpts
    h = make_engine("hf", model_path=paths[0], dtype="float32", max_model_len=MAX_MODEL_LEN)
    yield h
    h.close()


@needs_vllm
def test_update_matches_fresh_engine(ckpts, engines):
    """After load_weights, an engine generates exactly what a fresh engine of those weights does."""
    _, paths = ckpts
    a, b, refs = engines
    assert _tokens(refs[0]) != _tokens(refs[1]), "the two checkpoints must generate differently"

    a.load_weights(_stream(paths[1]))
    assert _tokens(a.generate(PROMPTS, GREEDY)) == _tokens(refs[1])
    a.load_weights(_stream(paths[0]))  # second update, back to where it started
    assert _tokens(a.generate(PROMPTS, GREEDY)) == _tokens(refs[0])

    b.load_weights(_stream(paths[0]))
    out = b.generate(PROMPTS, GREEDY)
    assert _tokens(out) == _tokens(refs[0])
    # same kernels and the same (re-packed) weights: log-probs agree bit for bit
    assert [o.logprobs for o in out] == [o.logprobs for o in refs[0]]
    b.load_weights(_stream(paths[1]))
    assert _tokens(b.generate(PROMPTS, GREEDY)) == _tokens(refs[1])


@needs_vllm
def test_hf_matches_vllm_greedy(ckpts, engines, hf):
    """transformers and vLLM give the same greedy tokens and finish reasons for the same weights."""
    _, paths = ckpts
    _, _, refs = engines
    out = hf.generate(PROMPTS, GREEDY)
    assert _tokens(out) == _tokens(refs[0])
    diff = max(abs(x - y) for o, r in zip(out, refs[0]) for x, y in zip(o.logprobs, r.logprobs))
    assert diff < LOGPROB_ATOL

    hf.load_weights(_stream(paths[1]))
    assert _tokens(hf.generate(PROMPTS, GREEDY)) == _tokens(refs[1])
    hf.load_weights(_stream(paths[0]))


@needs_vllm
def test_sampled_logprobs_match_hf_forward(ckpts, engines, hf):
    """vLLM's log-probs of sampled tokens are the raw model log-probs (temperature 1, no top-p),
    whatever the sampling temperature / top-p: equal to an HF full forward up to fp32 noise."""
    arch, _ = ckpts
    a, _, _ = engines
    diffs = []
    for sampling in (Sampling(n=2, temperature=1.0, max_tokens=32, seed=7, ignore_eos=True),
                     Sampling(n=2, temperature=0.7, top_p=0.9, max_tokens=32, seed=11, ignore_eos=True)):
        outs = a.generate(PROMPTS, sampling)
        assert [(o.prompt_index, o.sample_index) for o in outs] == [(i, k) for i in range(len(PROMPTS)) for k in range(2)]
        assert all(len(o.logprobs) == len(o.token_ids) == 32 for o in outs)
        assert len({tuple(o.token_ids) for o in outs}) == len(outs), "samples must not share a random stream"
        for o in outs:
            ref = _hf_forward_logprobs(hf.model, PROMPTS[o.prompt_index], o.token_ids)
            diffs.append((ref - torch.tensor(o.logprobs)).abs())
    d = torch.cat(diffs)
    print(f"\n{arch}: vLLM sampled-token log-probs vs HF forward (fp32, {d.numel()} tokens): "
          f"max {d.max().item():.2e}, mean {d.mean().item():.2e}")
    assert d.max().item() < LOGPROB_ATOL

    # the HF engine's own log-probs (incremental decoding with a KV cache) vs its full forward
    outs = hf.generate(PROMPTS[:2], Sampling(n=2, temperature=1.0, max_tokens=16, seed=3, ignore_eos=True))
    for o in outs:
        ref = _hf_forward_logprobs(hf.model, PROMPTS[o.prompt_index], o.token_ids)
        assert (ref - torch.tensor(o.logprobs)).abs().max().item() < LOGPROB_ATOL


@needs_vllm
def test_finish_reasons(ckpts, engines, hf):
    """Stop on eos or stop_token_ids (stop token kept), else length; the same in both engines."""
    arch, paths = ckpts
    a, _, _ = engines
    eos = model_eos_token_ids(paths[0])
    assert a.eos_token_ids == hf.eos_token_ids == eos
    for eng in (a, hf):
        longs = eng.generate(PROMPTS, Sampling(temperature=0, max_tokens=16, ignore_eos=True))
        assert all(o.finish_reason == "length" and len(o.token_ids) == 16 for o in longs)
        # a prompt whose greedy continuation has a not-yet-seen token at position >= 2 (some repeat one token)
        j, i = next((j, i) for j, o in enumerate(longs) for i in range(2, 16) if o.token_ids[i] not in o.token_ids[:i])
        prompt, long = PROMPTS[j:j + 1], longs[j]

        short = eng.generate(prompt, Sampling(temperature=0, max_tokens=5, ignore_eos=True))[0]
        assert short.finish_reason == "length" and short.token_ids == long.token_ids[:5]

        stop = eng.generate(prompt, Sampling(temperature=0, max_tokens=16, ignore_eos=True,
                                             stop_token_ids=[long.token_ids[i]]))[0]
        assert stop.finish_reason == "stop" and stop.token_ids == long.token_ids[:i + 1]
        assert len(stop.logprobs) == len(stop.token_ids)

        default = eng.generate(PROMPTS[:1], Sampling(temperature=0, max_tokens=16))[0]
        if arch == "llama":  # eos was chosen from this very continuation (of prompt 0)
            (e,) = eos
            assert default.finish_reason == "stop" and default.token_ids[-1] == e
            assert default.token_ids == longs[0].token_ids[:longs[0].token_ids.index(e) + 1]
        else:  # qwen2's tiny config has no eos
            assert not eos and default.token_ids == longs[0].token_ids and default.finish_reason == "length"

        # the context is full before max_tokens: "length", cut at max_model_len
        full = eng.generate([(PROMPTS[2] * 2)[:MAX_MODEL_LEN - 6]],
                            Sampling(temperature=0, max_tokens=16, ignore_eos=True))[0]
        assert full.finish_reason == "length" and len(full.token_ids) == 6


def _spmd_rank(paths):
    """One rank of an SPMD job: the trainer's gloo world exists before the engine is built."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    eng = make_engine("vllm", model_path=paths[0], dtype="float32", kv_cache_gib_cpu=0.0625,
                      max_model_len=MAX_MODEL_LEN, seed=rank)
    backend = eng.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    before = eng.generate([PROMPTS[rank]], GREEDY)
    eng.load_weights(_stream(paths[1]))
    after = eng.generate([PROMPTS[rank]], GREEDY)
    eng.close()
    x = torch.ones(1)
    dist.all_reduce(x)  # the caller's process group survives close()
    dist.destroy_process_group()
    return backend, [(o.token_ids, o.finish_reason) for o in before + after], x.item()


@needs_vllm
def test_spmd_ranks_with_own_engines(ckpts, engines):
    """Two gloo ranks (as under torchrun), each with an in-process engine on its own prompts: vLLM
    joins the existing world (external launcher), updates in place, and leaves the world intact."""
    arch, paths = ckpts
    if arch != "llama":
        pytest.skip("one architecture is enough for the distributed path")
    _, _, refs = engines
    results = run_ranks(_spmd_rank, 2, paths)
    for rank, (backend, outs, total) in enumerate(results):
        assert backend == "external_launcher" and total == 2
        assert outs == [(refs[s][rank].token_ids, refs[s][rank].finish_reason) for s in (0, 1)]


def test_hf_processed_logprobs(tiny_model_factory):
    """logprobs_mode="processed": log-probs under the distribution sampled from (temperature applied)."""
    path = tiny_model_factory("llama", seed=0)
    raw = make_engine("hf", model_path=path, logprobs_mode="raw")
    proc = make_engine("hf", model_path=path, logprobs_mode="processed")
    s = Sampling(n=2, temperature=0.5, max_tokens=8, seed=1, ignore_eos=True)
    (r, _), (p, _) = raw.generate(PROMPTS[:1], s)[:2], proc.generate(PROMPTS[:1], s)[:2]
    assert r.token_ids == p.token_ids  # same seed, same sampling
    with torch.no_grad():
        logits = raw.model(torch.tensor([PROMPTS[0] + r.token_ids])).logits[0, len(PROMPTS[0]) - 1:-1].float()
    tok = torch.tensor(r.token_ids)[:, None]
    want_raw = torch.log_softmax(logits, -1).gather(-1, tok)[:, 0]
    want_proc = torch.log_softmax(logits / 0.5, -1).gather(-1, tok)[:, 0]
    assert torch.allclose(torch.tensor(r.logprobs), want_raw, atol=LOGPROB_ATOL)
    assert torch.allclose(torch.tensor(p.logprobs), want_proc, atol=LOGPROB_ATOL)


def test_make_engine_and_sampling_validation(tiny_model_factory):
    with pytest.raises(ValueError):
        make_engine("bogus")
    with pytest.raises(ValueError):
        Sampling(top_p=0)
    assert Sampling(n=4, seed=10).request_seed(3) == 22 and Sampling().request_seed(3) is None
    # vLLM-only options are dropped (with a warning) when the HF engine is built
    h = make_engine("hf", model_path=tiny_model_factory("qwen2"), gpu_memory_utilization=0.5, kv_cache_gib_cpu=1)
    assert h.generate([[5, 6, 7]], Sampling(max_tokens=3, temperature=0))[0].finish_reason == "length"
    with pytest.raises(KeyError):
        h.load_weights([("not.a.param", torch.zeros(1))])


@pytest.mark.skipif(not vllm_available(), reason="needs vllm")
def test_cpu_tp_shared_memory_names_are_per_job(monkeypatch):
    """Two rollout-TP jobs on one machine: vLLM's CPU communicator named both jobs' /dev/shm
    segments alike (its init method is "env://" under the external launcher: ident "//")."""
    from types import SimpleNamespace

    from mcore_rl.rollout import vllm_engine

    try:
        from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed
    except ImportError:
        pytest.skip("this vLLM has no CPU shared-memory communicator")
    original = _CPUSHMDistributed.__dict__["make_group_name"]  # the staticmethod itself, restored below
    monkeypatch.setenv("VLLM_DIST_IDENT", "//")  # what vLLM's CPU worker sets from "env://"
    tp_group = SimpleNamespace(unique_name="tp:0", ranks=[0, 1])
    names = []
    try:
        for port in ("29611", "29622"):
            monkeypatch.setenv("MASTER_PORT", port)
            _CPUSHMDistributed.make_group_name = original
            _CPUSHMDistributed._mcore_rl_named = False
            vllm_engine._job_unique_cpu_shm_names()
            names.append(_CPUSHMDistributed.make_group_name(tp_group))
    finally:
        _CPUSHMDistributed.make_group_name = original
        _CPUSHMDistributed._mcore_rl_named = False
    assert names[0] != names[1] and all("/" not in n and "-tp:0-[0-1]-cpushm" in n for n in names), names


_RENDEZVOUS_CHILD = """
import datetime, os, socket, sys
import torch.distributed as dist
from mcore_rl.rollout.vllm_engine import own_rendezvous

def one_rank_group():  # what vLLM does for a one-rank engine: a new group at a fresh tcp:// address
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=float(sys.argv[2])))
    dist.destroy_process_group()

assert os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
if sys.argv[1] == "own":
    with own_rendezvous():
        one_rank_group()
    assert os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True"  # restored for the caller
else:
    one_rank_group()
print("GROUP-UP")
"""


@pytest.mark.parametrize("mode", ["own", "plain"])
def test_one_rank_engine_group_forms_under_torchrun(tmp_path, mode):
    """Under torchrun a one-rank engine's own process group waited forever for torchrun's agent
    store (a fresh engine beside the trainer hung on two GPUs). `own_rendezvous` lets it form;
    without it the same group times out (the check that the test sees the trap)."""
    import sys

    script = tmp_path / "child.py"
    script.write_text(_RENDEZVOUS_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(script), mode, "30" if mode == "own" else "3"]
    rc, out, err = _torchrun(cmd, 120)
    if mode == "own":
        assert rc == 0 and "GROUP-UP" in out, err[-2000:]
    else:
        assert rc != 0 and "GROUP-UP" not in out


def _torchrun(cmd: list[str], timeout: float):
    """(returncode, stdout, stderr) of a torchrun command; on timeout torchrun gets SIGTERM, which
    it forwards to its workers (a SIGKILL would orphan them: they run in sessions of their own)."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        err += f"\n[timed out after {timeout}s]"
    return proc.returncode, out, err


_TP2_CHILD = """
import sys
from mcore_rl.rollout import Sampling, make_engine
eng = make_engine("vllm", model_path=sys.argv[1], tensor_parallel_size=2, max_model_len=64, dtype="float32")
out = eng.generate([[5, 6, 7, 8]], Sampling(max_tokens=4, temperature=0, ignore_eos=True))
print("TOKENS", out[0].token_ids, flush=True)
eng.close()
"""


@needs_vllm
def test_rollout_tp2_engine_under_torchrun(tmp_path, tiny_model_factory):
    """`torchrun --nproc_per_node=2` with no process group of the caller's (the rollout command and
    benchmark): the TP=2 engine joins torchrun's world through its agent store and generates."""
    import sys

    script = tmp_path / "child.py"
    script.write_text(_TP2_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), tiny_model_factory("llama", seed=0)]
    rc, out, err = _torchrun(cmd, 300)
    assert rc == 0 and out.count("TOKENS") == 2, (out[-1000:], err[-3000:])
