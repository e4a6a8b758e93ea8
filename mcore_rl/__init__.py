"""mcore_rl: RL post-training of LLMs on megatron-core, with vLLM rollouts."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns at import when the optional apex / TransformerEngine kernels are absent;
# the torch fallbacks are what we choose on CPU, so these lines are noise for our users.
_warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
_warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
_warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
