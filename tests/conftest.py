"""Shared fixtures: tiny random HuggingFace models built locally (nothing from a hub)."""

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist workers (`-n 2` in pyproject.toml) share the cores: each computes on its share, and
# so do the processes it starts (most set OMP_NUM_THREADS=1 themselves).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)

# head_dim 32: the smallest head size vLLM's CPU attention accepts.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=250, max_position_embeddings=512)


def tiny_hf_config(arch: str = "llama", **overrides):
    """A transformers config of a tiny model of `arch` (llama, qwen2, qwen3, mistral, opt)."""
    import transformers as tf

    kw = dict(_TINY)
    if arch == "llama":
        cfg = tf.LlamaConfig(**{**kw, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128,
                                "rms_norm_eps": 1e-5, **overrides})
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**kw, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128,
                                "tie_word_embeddings": True, **overrides})
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**{**kw, "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "tie_word_embeddings": True, **overrides})
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**kw, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128,
                                  "sliding_window": None, **overrides})
    elif arch == "opt":
        cfg = tf.OPTConfig(**{"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                              "vocab_size": 250, "max_position_embeddings": 512, "word_embed_proj_dim": 64,
                              "do_layer_norm_before": True, **overrides})
    else:
        raise ValueError(arch)
    return cfg


def make_tiny_hf_model(path, arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """Write a tiny random HF checkpoint (safetensors + config) of `arch` to `path`; returns the path.

    Weights are drawn with a larger std than HF's init so that parity tests see non-trivial
    activations (biases and norms too, so a dropped bias or a swapped norm would show).
    """
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch, **overrides)
    cfg.torch_dtype = dtype
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm.weight" in name or "layernorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _launch_env_per_module():
    """Each module starts with the launcher variables the session started with. torch.distributed
    begun in this process, or a vLLM engine built in it, writes RANK, LOCAL_WORLD_SIZE, MASTER_PORT
    and the like into os.environ, and a process a later test starts would inherit them (and take
    itself for a rank of a torchrun world). Which modules ran before on this worker varies (xdist)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in names}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def tiny_model_factory(tmp_path):
    """`tiny_model_factory(arch, **overrides) -> path` of a fresh tiny random HF checkpoint."""
    counter = iter(range(1000))

    def make(arch="llama", seed=0, **overrides):
        return make_tiny_hf_model(tmp_path / f"{arch}_{next(counter)}", arch, seed=seed, **overrides)

    return make


# Run in parallel (pytest-xdist), a test module goes whole to one worker: the trainer runs that its
# module-scoped fixtures share are made once. Modules that share a session-scoped fixture go together.
_TOGETHER = {"tests/test_trainer.py": "tests/test_golden.py"}  # toy_default_run
# The modules that take longest (a serial CPU run, longest first) start first, so that no worker is
# left with one of them at the end while the other has nothing to do.
_LONGEST = ["tests/test_slurm.py", "tests/test_split.py", "tests/test_resume.py", "tests/test_strict_dist.py",
            "tests/test_faults.py",
            "tests/test_data_path.py", "tests/test_converter.py"]


def _module(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return _TOGETHER.get(path, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class WholeModules(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _module(nodeid)

    config.option.loadscopereorder = False  # keep the order of the collection (below)
    return WholeModules(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {path: i for i, path in enumerate(_LONGEST)}
        items.sort(key=lambda item: rank.get(_module(item.nodeid), len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_default_run(tmp_path_factory):
    """`mcore-rl train` with no config file (the toy default: PPO with a critic, 20 steps, vLLM), run
    once for the session: tests/test_golden.py compares its first steps with the golden curve and
    tests/test_trainer.py checks the whole run. Starts at once; calling the returned function waits
    for the run and gives (metrics rows, console log)."""
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("toy_default")
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TMPDIR=str(tmp))  # vLLM's socket files: a directory of its own
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["actor_rollout_ref.rollout.name=vllm", "trainer.logger=[console]", "trainer.export_hf_at_end=false",
            f"trainer.output_dir={tmp / 'run'}"]
    log = open(tmp / "log.txt", "w")  # a file, not a pipe: nothing blocks while other runs go on
    proc = subprocess.Popen([sys.executable, "-m", "mcore_rl.cli", "train", *args], cwd=repo, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def result():
        rc = proc.wait(timeout=600)
        text = (tmp / "log.txt").read_text()
        assert rc == 0, f"mcore-rl train exited {rc}:\n{text[-5000:]}"
        rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if line]
        return rows, text

    yield result
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
