"""Training prompts: loading (`load_prompts`) and per-step, DP-sharded batching (`PromptLoader`)."""

from mcore_rl.data.loader import PromptLoader
from mcore_rl.data.prompts import (
    DEFAULT_ANSWER_KEYS,
    BadRow,
    BadRowError,
    PromptDataset,
    PromptSample,
    get_key,
    iter_rows,
    load_prompts,
)

__all__ = ["DEFAULT_ANSWER_KEYS", "BadRow", "BadRowError", "PromptDataset", "PromptLoader", "PromptSample",
           "get_key", "iter_rows", "load_prompts"]
