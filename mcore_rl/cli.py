"""`mcore-rl` console script: a thin dispatcher to the commands in `mcore_rl/commands/`.

Every command reports a user error (a bad config value, a missing or damaged file, an output
that would overwrite its input) as one line, `mcore-rl <command>: error: ...`, with exit code 2;
`--debug` (anywhere on the command line) or MCORE_RL_DEBUG=1 adds the traceback. A second
Ctrl-C exits with 130. Anything else is a bug and keeps its traceback.
"""

import gc
import importlib
import os
import sys
import traceback

DEBUG_ENV = "MCORE_RL_DEBUG"

# subcommand -> (module, help). Modules are imported lazily so `mcore-rl info` stays fast.
COMMANDS = {
    "info": ("mcore_rl.commands.info", "print versions, devices and which accelerators are usable"),
    "convert": ("mcore_rl.commands.convert", "convert checkpoints: hf-to-mcore | mcore-to-hf"),
    "generate": ("mcore_rl.commands.generate", "load a model the Megatron way, sync it into the rollout engine, print completions"),
    "train": ("mcore_rl.commands.train", "run PPO / GRPO training (the toy task when given no config)"),
    "export": ("mcore_rl.commands.export", "export a training checkpoint's actor to HuggingFace format"),
    "plan": ("mcore_rl.commands.plan", "dry-run: rank layout and per-GPU memory estimate for a config"),
}


def usage() -> str:
    lines = ["usage: mcore-rl <command> [args] [--debug]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", f"--debug (or {DEBUG_ENV}=1): show the traceback of an error"]
    return "\n".join(lines)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or environment, not a bug in mcore_rl. Config, data, reward,
    model and checkpoint errors derive from ValueError (or are named here); OSError covers paths."""
    import yaml
    from omegaconf.errors import GrammarParseError

    from converters.hf_io import CheckpointError
    from mcore_rl.rewards import RewardFunctionError

    return (ValueError, OSError, CheckpointError, RewardFunctionError, NotImplementedError, yaml.YAMLError,
            GrammarParseError)


_guarding = False  # a command's own guard inside the dispatcher's leaves the reporting to the outer one


def guarded(prog: str, main, argv: list[str]) -> int:
    """Run `main(argv)`: a user error is one line on stderr and exit code 2, a second Ctrl-C 130."""
    global _guarding
    if _guarding:
        return int(main(argv) or 0)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        _guarding = True
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        _guarding = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--debug":  # `mcore-rl --debug train ...`: the command's guard reads it
        argv = argv[1:] + argv[:1]
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
    return guarded(f"mcore-rl {name}", module.main, rest)


def exiting(rc: int) -> int:
    """`rc`, for a process's entry point that exits with it next.

    Python's exit collects garbage over the whole heap, several times; once torch, megatron-core
    and vLLM are imported that heap holds hundreds of thousands of objects and the exit takes
    seconds. `gc.freeze()` takes everything alive now out of those collections and leaves it to
    the OS (files, loggers and process groups are closed by now). Never for a caller that goes
    on: it would not collect those objects again.
    """
    gc.freeze()
    return rc


def entry() -> int:
    """The `mcore-rl` console script."""
    return exiting(main())


if __name__ == "__main__":
    sys.exit(exiting(main()))
