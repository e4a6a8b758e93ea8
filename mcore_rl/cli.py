"""`mcore-rl` console script: a thin dispatcher; each subcommand lives with the code it drives."""

import importlib
import sys

# subcommand -> (module, help). Modules are imported lazily so `mcore-rl info` stays fast.
COMMANDS = {
    "info": ("mcore_rl.info", "print versions, devices and which accelerators are usable"),
    "convert": ("converters.cli", "convert checkpoints: hf-to-mcore | mcore-to-hf"),
    "generate": ("mcore_rl.rollout.cli", "load a model the Megatron way, sync it into the rollout engine, print completions"),
    "train": ("mcore_rl.trainer.main_ppo", "run PPO / GRPO training (the toy task when given no config)"),
    "export": ("mcore_rl.trainer.export", "export a training checkpoint's actor to HuggingFace format"),
    "plan": ("mcore_rl.plan", "dry-run: rank layout and per-GPU memory estimate for a config"),
}


def usage() -> str:
    lines = ["usage: mcore-rl <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mcore_rl import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mcore-rl: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
