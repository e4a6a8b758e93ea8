"""`mcore-rl plan`: a dry run that says, before a job is queued, how ranks will be laid out
and whether actor, critic, reference and the vLLM engine fit in each GPU's memory.

    mcore-rl plan [CONFIG.yaml] [key=value ...] [--nodes N] [--gpus-per-node G] [--gpu-mem-gib 80] [--json]

The config is read as `mcore-rl train` reads it: the same defaults, presets and checks, batch
sizes fitted the same way, and the same size checks (TP against the model's heads, ...). The
model's shape is the trainer's reading of its config.json (`ArchSpec`; no weights, no GPU);
with no `actor_rollout_ref.model.path` the toy model is planned, as `mcore-rl train` would
train it. With `actor_rollout_ref.rollout.placement=split` each side is planned on its own
GPUs: the training ranks' grid and Megatron phases, the rollout ranks' engines and vLLM.
Exit codes: 0 fits (both sides), 1 does not fit, 2 bad configuration.
All numbers are estimates (`mcore_rl.memory`; the formulas are in `estimate_memory`). Micro-
batches are rows x the padded length, or with `actor.use_dynamic_bsz` up to each pass's token
budget (`*_max_token_len_per_gpu`); the report names the key of the pass that sets the peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mcore_rl.distributed.env import LaunchEnv
from mcore_rl.distributed.layout import Layout, describe_layout, rank_layout
from mcore_rl.memory import GiB, JobShape, MemoryEstimate, estimate_memory, job_shape_from_config, model_spec
from mcore_rl.models.arch import ArchSpec, UnsupportedModelError


def _g(x: float) -> str:
    return f"{x / GiB:7.2f}"


def format_report(spec: ArchSpec, p: JobShape, est: MemoryEstimate) -> list[str]:
    lines = [
        f"model: {spec.hf_architecture}, {est.total_params / 1e9:.3f} B params (hidden {spec.hidden_size}, "
        f"layers {spec.num_layers}, heads {spec.num_attention_heads}/{spec.num_query_groups} kv, vocab {spec.vocab_size} "
        f"padded to {spec.padded_vocab_size}, tied {spec.tied_embeddings}), dtype bytes {p.dtype_bytes}",
        f"memory per GPU (GiB), most loaded pipeline stage; GPU {p.gpu_mem_gib:g} GiB; "
        f"distributed optimizer {'on' if p.distributed_optimizer else 'off'}; seq {est.seq_len}, "
        + (f"packed micro-batches (use_dynamic_bsz) of at most {p.ppo_max_token_len} tokens "
           f"(critic {p.critic_max_token_len})" if p.dynamic_bsz else
           f"padded micro-batches of {p.micro_batch} rows (critic {p.critic_micro_batch})"),
        f"  {'':<22}{'params':>9} {'weights':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'train':>7}",
    ]
    for name, m in (("actor", est.actor), ("critic", est.critic), ("ref", est.ref)):
        if m is None:
            why = ("no critic (adv_estimator != gae)" if name == "critic"
                   else "the actor with its LoRA adapters off (no model of its own)" if p.ref
                   else "no reference (no KL term)")
            lines.append(f"  {name:<7}{'':<15}  -- {why}")
            continue
        what = f"tp{p.tp} pp{p.pp}" + (f" lora{p.lora_rank}" if name == "actor" and p.lora_rank else "")
        lines.append(f"  {name:<7}{what:<15}{m.params / 1e6:8.1f}M {_g(m.weights)} {_g(m.grads)} "
                     f"{_g(m.optimizer)} {_g(m.activations)} {_g(m.train_total)}")
    budget = (f"kv_cache_gib {p.kv_cache_gib:g}" if p.kv_cache_gib
              else f"gpu_memory_utilization {p.gpu_memory_utilization:g}")
    where = ("on the rollout GPUs only" if p.split
             else f"{'sleeps' if p.free_cache_engine else 'stays'} while Megatron trains")
    lines += [
        f"  vLLM (tp {p.rollout_tp}, {budget} = {est.vllm_budget / GiB:.2f} GiB, {where}): "
        f"weights {est.vllm_weights / GiB:.2f}, other {est.vllm_other / GiB:.2f}, KV cache {est.vllm_kv / GiB:.2f} GiB "
        f"= {est.kv_tokens} tokens = {est.kv_tokens // max(1, est.seq_len)} sequences of {est.seq_len} at once "
        f"(each engine generates {est.seqs_per_engine} per step)",
        f"  fixed overhead {est.overhead / GiB:.2f} GiB",
    ]
    lines += _micro_batch_lines(p, est)
    lines += _split_peak_lines(p, est) if p.split else [
        "  phases: " + _phases(est.phases),
        f"peak {est.peak / GiB:.2f} GiB of {p.gpu_mem_gib:g} GiB ({est.peak_phase}): "
        + ("FITS" if est.fits else "DOES NOT FIT"),
    ]
    lines += [f"  problem: {msg}" for msg in est.problems]
    return lines


def _phases(phases: dict[str, float]) -> str:
    return " | ".join(f"{k} {v / GiB:.2f}" for k, v in phases.items())


def _split_peak_lines(p: JobShape, est: MemoryEstimate) -> list[str]:
    """Split placement: each side's phases on its own GPUs, and both peaks."""
    def ranks(lo: int, hi: int) -> str:
        return f"rank {lo}" if lo == hi else f"ranks {lo}-{hi}"

    return [
        f"  phases, training GPUs ({ranks(0, p.train_world - 1)}): " + _phases(est.phases),
        f"  phases, rollout GPUs ({ranks(p.train_world, p.world_size - 1)}; vLLM's budget + fixed overhead): "
        + _phases(est.rollout_gpu_phases),
        f"peak: training GPUs {est.peak / GiB:.2f} GiB ({est.peak_phase}), rollout GPUs "
        f"{est.rollout_gpu_peak / GiB:.2f} GiB, of {p.gpu_mem_gib:g} GiB each: "
        + ("FITS" if est.fits else "DOES NOT FIT"),
    ]


def _micro_batch_lines(p: JobShape, est: MemoryEstimate) -> list[str]:
    """Each model pass's micro-batch: the key that sizes it, its tokens, its memory; and which
    one sets the peak (or that the rollout does)."""
    mbs = p.micro_batches()
    what = "token budget" if p.dynamic_bsz else "rows"
    lines = [f"  micro-batches ({'packed' if p.dynamic_bsz else 'padded'}; memory beyond the models' states):"]
    for name, v in est.micro_batch_bytes.items():
        key, value, tokens = mbs[name]
        lines.append(f"    {name:<14}{key}={value} ({what}; <= {tokens} tokens): {v / GiB:.2f} GiB")
    if est.peak_phase in mbs:
        key, value, _ = mbs[est.peak_phase]
        lines.append(f"    the largest: {est.peak_phase} ({key}={value}) sets the "
                     + ("training GPUs' peak" if p.split else "peak"))
    else:
        lines.append(f"    the peak is the {est.peak_phase} phase (vLLM's budget), not a micro-batch")
    return lines


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mcore-rl plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value",
                    help="a preset or your YAML, then config overrides, as for mcore-rl train")
    ap.add_argument("--nodes", type=int, default=None, help="number of nodes (default: trainer.nnodes, else 1)")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs per node (default: trainer.n_gpus_per_node, else 1)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--json", action="store_true", help="print the layout and estimate as JSON")
    return ap


def _estimate(args):
    from mcore_rl.config import check_sizes, fit_batch_sizes, read_config

    path, overrides = (args.args[0], args.args[1:]) if args.args and "=" not in args.args[0] else (None, args.args)
    cfg, explicit = read_config(path, overrides)
    t = cfg.trainer
    nodes = next(n for n in (args.nodes, t.nnodes, 1) if n is not None)
    gpus = next(n for n in (args.gpus_per_node, t.n_gpus_per_node, 1) if n is not None)
    if nodes < 1 or gpus < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1 (got {nodes}, {gpus})")
    fit_batch_sizes(cfg, explicit, nodes * gpus)
    spec = model_spec(cfg)
    check_sizes(cfg, nodes * gpus, spec)
    p = job_shape_from_config(cfg, nodes, gpus, args.gpu_mem_gib)
    return spec, p, *_layouts(p), estimate_memory(spec, p)


def _layouts(p: JobShape) -> tuple[Layout, tuple[tuple[int, ...], ...] | None]:
    """The training ranks' grid and, with split placement, the job ranks of each rollout engine,
    as the trainer lays them out (`trainer.split.train_layout` and the rollout side's own world,
    which follows the training ranks)."""
    if not p.split:
        return rank_layout(p.world_size, p.tp, p.pp, rollout_tp=p.rollout_tp), None
    engines = rank_layout(p.rollout_world, p.rollout_tp, 1, rollout_tp=p.rollout_tp).rollout_groups
    return (rank_layout(p.train_world, p.tp, p.pp, rollout_tp=p.tp),
            tuple(tuple(p.train_world + r for r in g) for g in engines))


def _layout_json(layout: Layout, engines) -> dict:
    """Job ranks: TP/PP/DP over the ranks that train; rollout groups over those that generate."""
    return {"placement": "colocated" if engines is None else "split",
            "train_ranks": list(range(layout.world_size)),
            "rollout_ranks": sorted(r for g in (engines or layout.rollout_groups) for r in g),
            "tp_groups": layout.tp_groups, "pp_groups": layout.pp_groups, "dp_groups": layout.dp_groups,
            "rollout_groups": layout.rollout_groups if engines is None else engines}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec, p, layout, engines, est = _estimate(args)
    except (ValueError, FileNotFoundError, UnsupportedModelError) as e:  # ConfigError is a ValueError
        print(f"mcore-rl plan: error: {e}", file=sys.stderr)
        return 2
    rc = 0 if est.fits else 1
    if args.json:
        print(json.dumps({"layout": _layout_json(layout, engines), "inputs": asdict(p), "estimate": asdict(est)},
                         indent=1, default=str))
        return rc
    env = LaunchEnv(rank=0, world_size=p.world_size, local_rank=0, local_world_size=p.gpus_per_node, node_rank=0,
                    num_nodes=p.nodes, master_addr="", master_port=0,
                    launcher="single" if p.world_size == 1 else "torchrun")
    for line in describe_layout(layout, env, engines) + format_report(spec, p, est):
        print(line)
    return rc


if __name__ == "__main__":
    from mcore_rl.cli import exiting

    sys.exit(exiting(main()))
