"""Process groups, devices and CPU support for megatron-core."""

from mcore_rl.distributed.parallel import destroy, device, init_distributed  # noqa: F401
