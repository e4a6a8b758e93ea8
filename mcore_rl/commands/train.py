"""`mcore-rl train [CONFIG.yaml] [key=value ...]` == `python -m mcore_rl.commands.train [...]`.

With no arguments it runs the built-in toy task. Under torchrun or srun every rank runs this.

Exit codes: 0 done, or stopped by SIGTERM or a first Ctrl-C after writing a checkpoint (resume
with trainer.resume=auto, the default); 2 bad configuration or input (one line; --debug shows
the traceback); 3 stopped after trainer.max_bad_steps steps in a row with a non-finite loss or
gradient norm; 130 aborted by a second Ctrl-C (steps after the last checkpoint are lost).
"""

from __future__ import annotations

import sys


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("presets: configs/ppo.yaml, configs/grpo.yaml, configs/toy.yaml (default); keys: configs/defaults.yaml")
        raise SystemExit(0)
    config = None
    if argv and "=" not in argv[0]:
        config, argv = argv[0], argv[1:]
    return config, argv


def main(argv: list[str] | None = None, after_fit=None) -> int:
    """Train; `after_fit(trainer)` runs after a finished `fit()`, before the engine closes (the
    2-GPU benchmark checks the live engine against a fresh one there)."""
    from mcore_rl.cli import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded("mcore-rl train", lambda args: _train(args, after_fit), argv)


def _train(argv: list[str], after_fit) -> int:
    from mcore_rl.config import load_config
    from mcore_rl.distributed.watchdog import install_stack_dump_signal

    install_stack_dump_signal()  # `kill -USR1 <pid>` shows where a rank is (a hung collective, say)
    config, overrides = parse_args(argv)
    cfg = load_config(config, overrides)
    from mcore_rl.trainer.ppo_trainer import NonFiniteError, PPOTrainer

    bridge = None
    if cfg.actor_rollout_ref.rollout.placement == "split":
        bridge = _split(cfg)
        if bridge.side == "rollout":
            from mcore_rl.trainer.split import RolloutSide

            side = RolloutSide(cfg, bridge)
            try:
                side.run()
            finally:
                side.close()
            bridge.close()
            return 0
    trainer = PPOTrainer(cfg, bridge=bridge)
    rc = 0
    try:
        trainer.fit()
        if after_fit is not None:
            after_fit(trainer)
    except NonFiniteError as e:
        print(f"mcore-rl train: {e}", file=sys.stderr)
        rc = 3
    finally:
        trainer.close()
    if bridge is not None:  # the rollout ranks were told to stop: both sides leave together
        bridge.close()
    else:
        from mcore_rl.distributed import comm, destroy

        comm.agree(True)  # every rank is past its last collective before any communicator goes
        destroy()  # (torch warns of process groups left to the interpreter's exit)
    return rc


def _split(cfg):
    """Split placement: the sizes checked, then this rank's side (collective over the job)."""
    from mcore_rl.config import check_sizes, launch_world_size
    from mcore_rl.distributed.bridge import start_split

    check_sizes(cfg, launch_world_size())  # before any process group forms
    r = cfg.actor_rollout_ref.rollout
    return start_split(r.n_gpus, r.tensor_model_parallel_size, cfg.trainer.dist_timeout_s)


if __name__ == "__main__":
    from mcore_rl.cli import exiting

    sys.exit(exiting(main()))
