"""Training checkpoints: written atomically, found again after a crash, loadable at another layout.

    <output_dir>/checkpoints/
        step_00000004/
            actor/model/        megatron dist_checkpointing (any TP/PP/DP can load it); of a LoRA
                                actor, its adapters alone (the base: the HF model it starts from)
            actor/optim/        the optimizer's sharded state (Adam moments, fp32 master weights)
            actor/hf/           HF config + tokenizer: with mcore_rl.json, `actor/` is also a
            actor/mcore_rl.json   converter checkpoint (`mcore-rl convert mcore-to-hf`)
            critic/model/, critic/optim/      (PPO with a critic)
            rng/rank_00000.pt   per-rank RNG states
            trainer_state.json  step, data loader position, layout, config, run id, every
                                other file's size
        latest                  "step_00000004", written last

A save goes to a hidden temp sibling (`.step_00000004.tmp`) which is renamed into place only
when every rank has finished writing; `latest` is then replaced atomically. A crash at any
point leaves the previous checkpoint and pointer untouched; leftover temp dirs are ignored
and removed by the next save. Old checkpoints are pruned only after the new one is complete,
and only those older than it. A checkpoint damaged later (a truncated shard, a cut trainer
state) is found by its sizes and passed over for the newest sound one.

One output dir holds one run (its run id is in every checkpoint and metrics row): a fresh
start where another run left checkpoints or metrics is refused, or moves them aside on request.
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

from converters.adapter import base_fingerprint, check_base, lora_meta
from converters.checkpoint import META, last_line, load_model, model_state, save_model, save_sharded, write_side
from converters.hf_io import CheckpointError
from mcore_rl.distributed.comm import agree, all_reduce_scalars
from mcore_rl.models.lora import lora_of

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


def file_sizes(ckpt: str) -> dict[str, int]:
    """Every file under `ckpt` but the trainer state, by relative path: its size in bytes."""
    sizes = {}
    for dirpath, _, files in os.walk(ckpt):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ckpt)
            if rel != STATE:
                sizes[rel] = os.path.getsize(path)
    return sizes


def verify_checkpoint(ckpt: str) -> str | None:
    """Why `ckpt` cannot be resumed from, or None. The trainer state (written last) lists every
    file with its size at save time: a missing or truncated shard is caught here, before any
    process group or model exists (the contents are not re-read)."""
    try:
        state = read_state(ckpt)
    except FileNotFoundError:
        return f"no {STATE} (an incomplete save)"
    except (OSError, ValueError) as e:  # ValueError: cut or garbled JSON, bad UTF-8
        return f"{STATE} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{STATE} has no step"
    for rel, size in state.get("files", {}).items():  # checkpoints written before the list: not checked
        path = os.path.join(ckpt, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, {size} when saved"
    return None


def find_checkpoint(root: str, skipped: list | None = None) -> str | None:
    """The checkpoint `latest` names, else the newest complete one, else None; a damaged one is
    passed over for the next older one and appended to `skipped` as (path, why)."""
    candidates = []
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        name = open(pointer).read().strip()
        if STEP_RE.match(name) and os.path.exists(os.path.join(root, name, STATE)):
            candidates.append(os.path.join(root, name))
    candidates += [p for _, p in reversed(list_checkpoints(root)) if p not in candidates]
    for path in candidates:
        why = verify_checkpoint(path)
        if why is None:
            return path
        if skipped is not None:
            skipped.append((path, why))
    return None


def resolve_resume(resume: str, root: str, skipped: list | None = None, name: str = "trainer.resume") -> str | None:
    """`trainer.resume`: auto -> newest under `root` (or None: fresh start); off -> None;
    a path -> that checkpoint (a step dir, or a checkpoints root whose newest is taken).
    Damaged checkpoints are passed over (see `find_checkpoint`), except one named exactly.
    `name` is what errors call the argument."""
    resume = str(resume)
    if resume.lower() in ("off", "false", "none", "null", ""):  # YAML reads a bare `off` as False
        return None
    if resume == "auto":
        return find_checkpoint(root, skipped)
    path = os.path.abspath(os.path.expanduser(resume))
    if os.path.exists(os.path.join(path, STATE)):
        why = verify_checkpoint(path)
        if why:
            raise ValueError(f"{name}={resume}: this checkpoint is damaged ({why}); name an earlier "
                             f"one, or its checkpoints directory to take the newest complete one")
        return path
    for candidate in (path, os.path.join(path, "checkpoints")):
        found = find_checkpoint(candidate, skipped)
        if found:
            return found
    raise FileNotFoundError(f"{name}={resume}: no complete checkpoint there (expected {STATE} in a "
                            f"step_NNNNNNNN directory, or a checkpoints directory holding some)")


# ------------------------------------------------------------------------------ one run per output dir
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "hf_model", "config.yaml")
PREVIOUS = "previous"  # where trainer.on_previous_run=move_aside puts another run's files


class PreviousRunError(ValueError):
    """A fresh start in an output dir that holds another run's checkpoints or metrics."""


def _nonempty(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path)) or os.path.isfile(path) and os.path.getsize(path) > 0


def previous_run(output_dir: str) -> list[str]:
    """What an earlier run left in `output_dir` that a new run would overwrite, prune or mix with."""
    found = []
    root = os.path.join(output_dir, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if STEP_RE.match(d)) if os.path.isdir(root) else []
    if steps:
        found.append(f"checkpoints {steps[0]}" + (f"..{steps[-1]}" if len(steps) > 1 else ""))
    for name in ("metrics.jsonl", "hf_model", "tensorboard"):
        if _nonempty(os.path.join(output_dir, name)):
            found.append(name)
    return found


def check_run_dir(output_dir: str, resume_from: str | None, policy: str, skipped: list,
                  resume_auto: bool = False) -> list[str]:
    """A run starts fresh (`resume_from` None) or from a checkpoint of another directory only in
    an output dir free of other runs' state: their checkpoints would be pruned as newer, `latest`
    would name them, metrics would mix. Returns what is in the way when `policy` is move_aside,
    or when `resume=auto` found nothing sound to continue (a job killed before its first
    checkpoint and started again: its files are kept, aside); the caller moves it (see
    `move_previous_run`). Raises PreviousRunError otherwise."""
    if policy not in ("error", "move_aside"):
        raise ValueError(f"trainer.on_previous_run={policy!r}: must be error or move_aside")
    root = os.path.join(output_dir, "checkpoints")
    if resume_from is not None and os.path.dirname(os.path.realpath(resume_from)) == os.path.realpath(root):
        return []  # continuing this directory's own run
    found = previous_run(output_dir)
    if not found or policy == "move_aside" or (resume_auto and resume_from is None):
        return found
    damaged = "".join(f"; {os.path.basename(p)} is damaged: {why}" for p, why in skipped)
    start = "a fresh start" if resume_from is None else f"resuming {resume_from}"
    raise PreviousRunError(
        f"{output_dir} holds another run ({', '.join(found)}{damaged}) and {start} would delete or mix with it. "
        f"Continue it with trainer.resume=auto, write elsewhere with trainer.output_dir=DIR (or another "
        f"trainer.experiment_name), or move it to {os.path.join(output_dir, PREVIOUS)}/ with "
        f"trainer.on_previous_run=move_aside")


def previous_run_id(output_dir: str) -> str | None:
    """The run id an earlier run left in its checkpoints or metrics, if any."""
    for _, path in reversed(list_checkpoints(os.path.join(output_dir, "checkpoints"))):
        try:
            run_id = read_state(path).get("run_id")
        except (OSError, ValueError):
            continue
        if run_id:
            return run_id
    try:
        with open(os.path.join(output_dir, "metrics.jsonl"), "rb") as f:
            last = f.read().splitlines()[-1]
        return json.loads(last).get("run_id")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def move_previous_run(output_dir: str) -> str:
    """Move an earlier run's files to <output_dir>/previous/<its run id>/ (renames: nothing copied)."""
    name = previous_run_id(output_dir) or time.strftime("unnamed-%Y%m%d-%H%M%S")
    dest = os.path.join(output_dir, PREVIOUS, name)
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(output_dir, PREVIOUS, f"{name}.{n}")
    os.makedirs(dest)
    for f in RUN_FILES:
        if os.path.exists(os.path.join(output_dir, f)):
            os.replace(os.path.join(output_dir, f), os.path.join(dest, f))
    return dest


def new_run_id() -> str:
    """A name for a fresh run, the same on every rank (rank 0 draws it; collective)."""
    import secrets

    mine = [time.time(), secrets.randbelow(1 << 24)] if _rank() == 0 else [0.0, 0.0]
    seconds, nonce = all_reduce_scalars(mine, op="max")
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(seconds)) + f"-{int(nonce):06x}"


def read_state(ckpt: str) -> dict:
    with open(os.path.join(ckpt, STATE)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ model + optimizer
def _inner(model):
    return model.module if hasattr(model, "module") else model


def save_model_and_optimizer(model, opt, where: str) -> None:
    """Collective: this rank's shards of the model and of its optimizer state. A LoRA model saves
    its adapters alone: its frozen base is the HF checkpoint it starts from (`mcore_rl.json`)."""
    adapters_only = lora_of(model) is not None
    save_model(_inner(model), os.path.join(where, "model"), adapters_only)
    if opt is not None:
        sd = opt.sharded_state_dict(model_state(_inner(model), adapters_only), metadata=OPTIM_METADATA)
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

    adapters_only = lora_of(model) is not None
    load_model(_inner(model), os.path.join(where, "model"), adapters_only)
    if opt is not None:
        # after the model: the optimizer's fp32 master weights are loaded from the checkpoint too
        why = optimizer_state_unloadable(opt)
        if why:
            raise NotImplementedError(why)
        sd = opt.sharded_state_dict(model_state(_inner(model), adapters_only), is_loading=True, metadata=OPTIM_METADATA)
        opt.load_state_dict(dist_checkpointing.load(sd, os.path.join(where, "optim")))


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
    ok = all(bool(torch.isfinite(p).all()) for m in models if m is not None for p in _inner(m).parameters())
    return not agree(not ok)


def save_checkpoint(root: str, step: int, *, actor, actor_opt, critic=None, critic_opt=None,
                    hf_side_dir: str, trainer_state: dict, keep: int | None = None, rank_state: dict | None = None) -> str:
    """Collective. Returns the published checkpoint path. `rank_state`: this rank's own extra
    state (e.g. the samples of a batch in flight), saved beside its RNG state."""
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
    torch.save({**rng_state(), "rank_state": rank_state}, os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        inner = _inner(actor)  # `actor/` doubles as a converter checkpoint (a LoRA one exports merged)
        lora = lora_of(inner)
        write_side(os.path.join(tmp, "actor"), hf_side_dir, inner.mcore_rl_spec, inner.config.params_dtype,
                   trainer_state.get("layout", {}),
                   lora={**lora_meta(lora), "base_model": os.path.abspath(hf_side_dir),
                         "base_fingerprint": base_fingerprint(hf_side_dir)} if lora else None)
        with open(os.path.join(tmp, STATE), "w") as f:  # last file inside: marks the dir complete
            json.dump({**trainer_state, "step": step, "saved_at": time.time(),
                       "save_seconds": time.perf_counter() - t0, "files": file_sizes(tmp)}, f, indent=2)
        if os.path.exists(final):  # the same step saved again (e.g. SIGTERM right after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = os.path.join(root, f".{LATEST}.tmp")
        with open(pointer_tmp, "w") as f:
            f.write(step_dir_name(step) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(root, LATEST))
        if keep is not None and keep > 0:  # only older, sound steps go and count: this one is the newest
            older = [p for s, p in list_checkpoints(root) if s < step and verify_checkpoint(p) is None]
            for old in older[:max(len(older) - (keep - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def check_lora_base(ckpt: str, base: str) -> None:
    """A LoRA checkpoint holds its adapters alone: refuse to resume them on another base model than the
    one they were trained on (ValueError)."""
    meta_path = os.path.join(ckpt, "actor", META)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            lora = json.load(f).get("lora")
        if lora:
            check_base(lora, base, f"checkpoint {ckpt} (actor_rollout_ref.model.path={base})")


def load_checkpoint(ckpt: str, *, actor, actor_opt, critic=None, critic_opt=None, layout: dict) -> dict:
    """Collective. Loads weights and optimizer states (any saved layout), and RNG states and this
    rank's `rank_state` when the layout is the one saved; returns the trainer state."""
    from torch.distributed.checkpoint.api import CheckpointException

    state = read_state(ckpt)
    if critic is not None and not os.path.isdir(os.path.join(ckpt, "critic")):
        raise FileNotFoundError(f"{ckpt} has no critic (saved by a run without one) but this run trains a critic")
    try:
        load_model_and_optimizer(actor, actor_opt, os.path.join(ckpt, "actor"))
        if critic is not None:
            load_model_and_optimizer(critic, critic_opt, os.path.join(ckpt, "critic"))
    except NotImplementedError:  # says itself what to change
        raise
    except (RuntimeError, EOFError, KeyError, CheckpointException) as e:  # the sizes matched, the contents not
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded ({last_line(e)}); resume from an earlier one "
                              f"with trainer.resume=PATH") from e
    rng = os.path.join(ckpt, "rng", f"rank_{_rank():05d}.pt")
    state["rank_state"] = None
    if state.get("layout") == layout and os.path.exists(rng):
        saved = torch.load(rng, weights_only=False)
        set_rng_state(saved)
        state["rng_restored"], state["rank_state"] = True, saved.get("rank_state")
    else:
        state["rng_restored"] = False
    return state
