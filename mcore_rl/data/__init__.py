"""Training prompts: loading (`load_prompts`) and per-step, DP-sharded batching (`PromptLoader`)."""

from mcore_rl.data.loader import PromptLoader
from mcore_rl.data.prompts import (
    DEFAULT_ANSWER_KEYS,
    BadRow,
    BadRowError,
    Prompt,
    PromptDataset,
    get_key,
    iter_rows,
    load_prompts,
)

__all__ = ["DEFAULT_ANSWER_KEYS", "BadRow", "BadRowError", "Prompt", "PromptDataset", "PromptLoader", "get_key",
           "iter_rows", "load_prompts"]
