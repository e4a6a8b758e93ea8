"""Training checkpoints: written atomically, found again after a crash, loadable at another layout.

    <output_dir>/checkpoints/
        step_00000004/
            actor/model/        megatron dist_checkpointing (any TP/PP/DP can load it)
            actor/optim/        the optimizer's sharded state (Adam moments, fp32 master weights)
            actor/hf/           HF config + tokenizer: with mcore_rl.json, `actor/` is also a
            actor/mcore_rl.json   converter checkpoint (`mcore-rl convert mcore-to-hf`)
            critic/model/, critic/optim/      (PPO with a critic)
            rng/rank_00000.pt   per-rank RNG states
            trainer_state.json  step, data loader position, layout, config
        latest                  "step_00000004", written last

A save goes to a hidden temp sibling (`.step_00000004.tmp`) which is renamed into place only
when every rank has finished writing; `latest` is then replaced atomically. A crash at any
point leaves the previous checkpoint and pointer untouched; leftover temp dirs are ignored
and removed by the next save. Old checkpoints are pruned only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

STEP_RE = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
STATE = "trainer_state.json"
# optimizer state in a format every TP/PP/DP layout can load (megatron's metadata keys)
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` as (step, path), oldest first (temp dirs are not listed)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_RE.match(d))]
    return sorted(p for p in found if os.path.exists(os.path.join(p[1], STATE)))


def find_checkpoint(root: str) -> str | None:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        name = open(pointer).read().strip()
        path = os.path.join(root, name)
        if STEP_RE.match(name) and os.path.exists(os.path.join(path, STATE)):
            return path
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str, root: str) -> str | None:
    """`trainer.resume`: auto -> newest under `root` (or None: fresh start); off -> None;
    a path -> that checkpoint (a step dir, or a checkpoints root whose newest is taken)."""
    resume = str(resume)
    if resume.lower() in ("off", "false", "none", "null", ""):  # YAML reads a bare `off` as False
        return None
    if resume == "auto":
        return find_checkpoint(root)
    path = os.path.abspath(os.path.expanduser(resume))
    if os.path.exists(os.path.join(path, STATE)):
        return path
    for candidate in (path, os.path.join(path, "checkpoints")):
        found = find_checkpoint(candidate)
        if found:
            return found
    raise FileNotFoundError(f"trainer.resume={resume}: no complete checkpoint there (expected {STATE} in a "
                            f"step_NNNNNNNN directory, or a checkpoints directory holding some)")


def read_state(ckpt: str) -> dict:
    with open(os.path.join(ckpt, STATE)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ model + optimizer
def _inner(model):
    return model.module if hasattr(model, "module") else model


def save_model_and_optimizer(model, opt, where: str) -> None:
    """Collective: this rank's shards of the model and of its optimizer state."""
    from converters.checkpoint import save_model, save_sharded

    save_model(_inner(model), os.path.join(where, "model"))
    if opt is not None:
        sd = opt.sharded_state_dict(_inner(model).sharded_state_dict(), metadata=OPTIM_METADATA)
        save_sharded(sd, os.path.join(where, "optim"))


def optimizer_state_unloadable(opt) -> str | None:
    """Why this optimizer's checkpointed state cannot be loaded back, or None.

    megatron-core's distributed optimizer loads its state only with TE's or Apex's fused Adam;
    with torch's Adam (what runs without them) its loader trips over the per-parameter `step`
    (megatron-core 0.16), and a non-distributed optimizer cannot read that state either."""
    try:
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer
    except ImportError:
        return None
    if not HAVE_APEX_OR_TE and any(isinstance(o, DistributedOptimizer)
                                   for o in getattr(opt, "chained_optimizers", [opt])):
        return ("actor.use_distributed_optimizer=true without transformer-engine or apex: megatron-core "
                "cannot load a distributed optimizer's checkpointed state with torch's Adam, so this run "
                "cannot be resumed. Install the `te` extra, or use use_distributed_optimizer=false")
    return None


def load_model_and_optimizer(model, opt, where: str) -> None:
    from megatron.core import dist_checkpointing

    from converters.checkpoint import load_model

    load_model(_inner(model), os.path.join(where, "model"))
    if opt is not None:
        # after the model: the optimizer's fp32 master weights are loaded from the checkpoint too
        why = optimizer_state_unloadable(opt)
        if why:
            raise NotImplementedError(why)
        sd = opt.sharded_state_dict(_inner(model).sharded_state_dict(), is_loading=True, metadata=OPTIM_METADATA)
        opt.load_state_dict(dist_checkpointing.load(sd, os.path.join(where, "optim")))


def start_writer_helper_ignoring_sigterm() -> None:
    """megatron's checkpoint writer reports through a helper process (a multiprocessing Manager,
    spawned at the first save). Slurm sends SIGTERM to every process of a job before preemption
    or the time limit; the helper would die with it and the very save SIGTERM asks for would
    fail. Start it now with SIGTERM ignored: an ignored signal stays ignored in the new process."""
    import signal

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", True) is not None or not hasattr(fa, "_get_write_results_queue"):
        return  # already started, or a megatron-core without the helper
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        fa._get_write_results_queue()
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised: nothing to keep
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])


# ------------------------------------------------------------------------------ save / load
def all_finite(*models) -> bool:
    """True when every parameter of every model is finite on every rank (collective)."""
    from mcore_rl.distributed.comm import agree

    ok = all(bool(torch.isfinite(p).all()) for m in models if m is not None for p in _inner(m).parameters())
    return not agree(not ok)


def save_checkpoint(root: str, step: int, *, actor, actor_opt, critic=None, critic_opt=None,
                    hf_side_dir: str, trainer_state: dict, keep: int | None = None) -> str:
    """Collective. Returns the published checkpoint path."""
    from converters.checkpoint import write_side

    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, f".{step_dir_name(step)}.tmp")
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):  # temp dirs of interrupted saves
            if d.startswith(".step_") and d.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()
    t0 = time.perf_counter()
    save_model_and_optimizer(actor, actor_opt, os.path.join(tmp, "actor"))
    if critic is not None:
        save_model_and_optimizer(critic, critic_opt, os.path.join(tmp, "critic"))
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        inner = _inner(actor)  # `actor/` doubles as a converter checkpoint
        write_side(os.path.join(tmp, "actor"), hf_side_dir, inner.mcore_rl_spec, inner.config.params_dtype,
                   trainer_state.get("layout", {}))
        with open(os.path.join(tmp, STATE), "w") as f:  # last file inside: marks the dir complete
            json.dump({**trainer_state, "step": step, "saved_at": time.time(),
                       "save_seconds": time.perf_counter() - t0}, f, indent=2)
        if os.path.exists(final):  # the same step saved again (e.g. SIGTERM right after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = os.path.join(root, f".{LATEST}.tmp")
        with open(pointer_tmp, "w") as f:
            f.write(step_dir_name(step) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(root, LATEST))
        if keep is not None and keep > 0:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(ckpt: str, *, actor, actor_opt, critic=None, critic_opt=None, layout: dict) -> dict:
    """Collective. Loads weights and optimizer states (any saved layout), and RNG states when the
    layout is the one saved; returns the trainer state."""
    state = read_state(ckpt)
    load_model_and_optimizer(actor, actor_opt, os.path.join(ckpt, "actor"))
    if critic is not None:
        if not os.path.isdir(os.path.join(ckpt, "critic")):
            raise FileNotFoundError(f"{ckpt} has no critic (saved by a run without one) but this run trains a critic")
        load_model_and_optimizer(critic, critic_opt, os.path.join(ckpt, "critic"))
    rng = os.path.join(ckpt, "rng", f"rank_{_rank():05d}.pt")
    if state.get("layout") == layout and os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))
        state["rng_restored"] = True
    else:
        state["rng_restored"] = False
    return state
