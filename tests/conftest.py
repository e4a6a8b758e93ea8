"""Shared fixtures: tiny random HuggingFace models built locally (nothing from a hub)."""

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture
def tiny_model_factory(tmp_path):
    """`tiny_model_factory(arch, **overrides) -> path` of a fresh tiny random HF checkpoint."""
    counter = iter(range(1000))

    def make(arch="llama", seed=0, **overrides):
        return make_tiny_hf_model(tmp_path / f"{arch}_{next(counter)}", arch, seed=seed, **overrides)

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
