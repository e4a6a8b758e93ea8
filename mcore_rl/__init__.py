"""mcore_rl: RL post-training of LLMs on megatron-core, with vLLM rollouts."""

__version__ = "0.1.0"
