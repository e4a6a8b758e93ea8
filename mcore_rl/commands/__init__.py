"""The `mcore-rl` commands, one module each: parse the command line, check the input, call the
library. `mcore_rl/cli.py` dispatches to them; each also runs as `python -m mcore_rl.commands.NAME`
(under torchrun or srun too)."""
