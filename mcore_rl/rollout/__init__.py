"""Rollout engines: generate samples (token ids + log-probs) and take weight updates in place.

``make_engine("vllm" | "hf" | "auto", **kwargs)`` builds one; ``auto`` is vLLM when it can be
imported, else the transformers engine. Engines are imported lazily so that importing this
package does not import vLLM.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging

from .base import CopySlot, CopySlots, RolloutEngine, RolloutOutput, Sampling, WeightTarget, model_eos_token_ids

logger = logging.getLogger(__name__)

__all__ = ["CopySlot", "CopySlots", "RolloutEngine", "RolloutOutput", "Sampling", "WeightTarget", "make_engine",
           "vllm_available", "model_eos_token_ids"]


def vllm_available() -> bool:
    """Whether vLLM is installed (checked without importing it: the import takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def make_engine(name: str = "auto", **kwargs) -> RolloutEngine:
    """Build a rollout engine; `kwargs` go to `VLLMEngine` or `HFEngine`.

    The transformers engine ignores (with a warning) the vLLM-only options it does not take,
    so one config serves both when ``auto`` falls back.
    """
    if name == "auto":
        name = "vllm" if vllm_available() else "hf"
    if name == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(**kwargs)
    if name == "hf":
        from .hf_engine import HFEngine

        accepted = inspect.signature(HFEngine.__init__).parameters
        dropped = sorted(k for k in kwargs if k not in accepted)
        if dropped:
            logger.warning("hf rollout engine ignores %s", ", ".join(dropped))
        return HFEngine(**{k: v for k, v in kwargs.items() if k in accepted})
    raise ValueError(f"unknown rollout engine {name!r} (expected 'vllm', 'hf' or 'auto')")
