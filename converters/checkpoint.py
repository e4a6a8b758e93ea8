"""HF checkpoint <-> megatron `dist_checkpointing` checkpoint.

A converted checkpoint is a directory:

    model/           megatron dist_checkpointing (torch_dist), loadable at any TP/PP
    hf/              the HF config.json, generation config and tokenizer files
    mcore_rl.json    what wrote it: architecture, dtype, the TP/PP it was written at

Both directions stream: no rank ever holds its whole model shard. hf-to-mcore runs SPMD on
TP x PP ranks (the CLI spawns them as local gloo processes when run as one process with
--tp/--pp > 1); each rank builds its shard of the model on the meta device (names, shapes,
sharding; no storage) and `dist_checkpointing.save` writes it through
`converters.streaming.StreamingSaveStrategy`, which makes each parameter from the HF
checkpoint just before writing it. mcore-to-hf reads the checkpoint one tensor at a time
(whatever TP/PP wrote it), turns it into HF tensors with the mapping and writes them straight
into safetensors shards laid out in advance. Peak memory is a few copies of the largest
single tensor (for most models the embedding), not the model; see `converters/streaming.py`.
Outputs go to a temporary sibling directory that is renamed into place at the end, so an
interrupted conversion never leaves a half-written target.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import time

import torch
import torch.distributed as dist

from converters.adapter import ADAPTER_DIR, check_base, lora_meta, merge, write_adapter
from converters.hf_io import CheckpointError, HFReader, HFWriter, copy_side_files, shard_source
from converters.mapping import LAYER, LORA, NameIndex, Rule, hf_module, is_lora, lora_rules, rules_for
from converters.mapping import mcore_to_hf as mapping_mcore_to_hf
from mcore_rl.models.arch import ArchSpec, arch_from_hf_config

META = "mcore_rl.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, hf_config: dict) -> torch.dtype:
    if name == "auto":
        name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32").replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def overlaps(a: str, b: str) -> bool:
    """Whether paths `a` and `b` are the same, or one lies inside the other (links resolved)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output_dir(out: str, force: bool, inputs: tuple[str, ...] = ()) -> None:
    """Refuse to write into a non-empty directory unless forced, and ever into (or around) what
    is read: --force replaces `out` whole, input included (checked before any work)."""
    for path in inputs:
        if overlaps(out, path):
            raise ValueError(f"--out {out} is, contains or lies inside the input {path}; replacing it would delete "
                             f"the input: write somewhere else")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise FileExistsError(f"output directory {out} exists and is not empty; pass --force to replace it")


def staging_dir(out: str, tag: str | None = None) -> str:
    """A temp sibling of `out` (same filesystem, so the final rename is atomic); same on all ranks."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tag = tag or os.environ.get("MASTER_PORT", str(os.getpid()))
    return os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{tag}")


@contextlib.contextmanager
def removed_on_failure(tmp: str):
    """A staging dir that a failed (or interrupted) conversion removes: no hidden full-size leftovers."""
    try:
        yield tmp
    except BaseException:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: str, out: str) -> None:
    """Atomically move `tmp` to `out`; an existing `out` (only with --force) is removed after."""
    old = None
    if os.path.exists(out):
        old = out.rstrip("/") + f".old-{int(time.time())}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_side(ckpt_dir: str, hf_side_dir: str, spec: ArchSpec, dtype: torch.dtype, written_at: dict,
               lora: dict | None = None) -> None:
    """Everything of a converted checkpoint but `model/`: the HF config and tokenizer in `hf/`
    and the `mcore_rl.json` that says what wrote it (and, for a LoRA model, its `lora_meta`)."""
    os.makedirs(os.path.join(ckpt_dir, "hf"))
    copy_side_files(hf_side_dir, os.path.join(ckpt_dir, "hf"))
    meta = {"format": "mcore_rl/dist_checkpoint/v1", "hf_architecture": spec.hf_architecture,
            "dtype": str(dtype).replace("torch.", ""), "written_at": written_at}
    if lora is not None:
        meta["lora"] = lora
    with open(os.path.join(ckpt_dir, META), "w") as f:
        json.dump(meta, f, indent=2)


def save_sharded(sharded_state_dict: dict, ckpt_dir: str) -> None:
    """dist_checkpointing save of this rank's part of a sharded state dict (collective)."""
    from megatron.core import dist_checkpointing

    if _rank0():
        os.makedirs(ckpt_dir, exist_ok=True)
    _barrier()
    _results_queue_in_process()
    dist_checkpointing.save(sharded_state_dict, ckpt_dir)


def _results_queue_in_process() -> None:
    """megatron's torch_dist writer collects each save's file list through one queue per process,
    which it makes on the first save with a spawned `multiprocessing` Manager: a helper process
    that takes seconds to start and, being in the job's process group, dies of the SIGTERM or
    Ctrl-C that asks for the very save. That queue is for an async save, whose writing runs in
    another process; a synchronous save, as here, puts and takes in this process, so a plain
    queue serves, and no helper exists."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def model_state(model, adapters_only: bool = False) -> dict:
    """`model`'s sharded state dict; with `adapters_only`, its LoRA adapters alone (the frozen base
    is the HF checkpoint it was loaded from)."""
    sd = model.sharded_state_dict()
    return {k: v for k, v in sd.items() if is_lora(k)} if adapters_only else sd


def save_model(model, ckpt_dir: str, adapters_only: bool = False) -> None:
    """dist_checkpointing save of this rank's shard of `model` (collective over all ranks)."""
    save_sharded(model_state(model, adapters_only), ckpt_dir)


def load_model(model, ckpt_dir: str, adapters_only: bool = False) -> None:
    """dist_checkpointing load into this rank's shard, whatever TP/PP the checkpoint was saved at
    (`adapters_only`: the LoRA adapters, into a model whose base is loaded already)."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no megatron checkpoint at {ckpt_dir}")
    state = dist_checkpointing.load(model_state(model, adapters_only), ckpt_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and (is_lora(k) or not adapters_only)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_meta_model(spec: ArchSpec, dtype: torch.dtype):
    """This rank's shard of the model on the meta device: parameter names, shapes and sharding,
    no storage (call after `init_distributed`)."""
    from mcore_rl.models.build import build_model

    with torch.device("meta"):
        return build_model(spec, dtype=dtype, device=torch.device("meta"))


def hf_to_mcore(hf_path: str, out: str, tp: int = 1, pp: int = 1, dtype: str = "auto", force: bool = False,
                progress: bool = True) -> str:
    from mcore_rl.distributed import init_distributed

    from converters.streaming import save_streaming

    spec = arch_from_hf_config(hf_path)
    spec.check_parallel(tp, pp)
    check_output_dir(out, force, inputs=(hf_path,))
    reader = HFReader(hf_path)  # fails early on missing / corrupt weights
    init_distributed(tp, pp)
    if dist.get_world_size() != tp * pp:
        raise ValueError(f"hf-to-mcore runs on exactly TP x PP = {tp * pp} ranks, got {dist.get_world_size()}")
    torch_dtype = resolve_dtype(dtype, spec.hf_config)
    model = build_meta_model(spec, torch_dtype)
    source = shard_source(model, spec, reader)
    params = dict(model.named_parameters())
    with removed_on_failure(staging_dir(out)) as tmp:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            write_side(tmp, hf_path, spec, torch_dtype, {"tp": tp, "pp": pp})
            os.makedirs(os.path.join(tmp, "model"))
        _barrier()
        save_streaming(model, lambda name: source.shard(name, params[name].shape, params[name].dtype),
                       os.path.join(tmp, "model"), progress=progress and _rank0())
        _barrier()
        if _rank0():
            publish(tmp, out)
    _barrier()
    return out


def _hf_layout(rule: Rule, layer: int | None, shard_shape, dtype: torch.dtype, tp: int, spec: ArchSpec):
    """(HF name, shape, dtype) of what `rule` makes of `tp` shards of `shard_shape`, computed on
    meta tensors (no data)."""
    metas = [torch.empty(shard_shape, dtype=dtype, device="meta")] * tp
    return [(n, tuple(t.shape), t.dtype) for n, t in zip(rule.hf_names(layer), mapping_mcore_to_hf(rule, metas, spec))]


def _staged_writer(tmp: str, layout: list, shard_mb: int) -> HFWriter:
    """A fresh staging dir with an HF writer that knows every tensor up front (writes in place)."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return HFWriter(tmp, shard_mb=shard_mb, tensors=layout)


def _finish_hf(writer: HFWriter, hf_side_dir: str, tmp: str, out: str) -> None:
    """Close the shards, add config and tokenizer, and move the staging dir to `out`."""
    writer.close()
    copy_side_files(hf_side_dir, tmp)
    publish(tmp, out)


def export_hf(model, hf_side_dir: str, out: str, force: bool = False, shard_mb: int = 2048,
              progress: bool = True) -> str:
    """Write a live (any TP/PP) model as an HF checkpoint; rank 0 writes, all ranks gather.

    A LoRA model is written merged, with its adapters in peft's format in `out`/lora_adapter
    (`converters.adapter`)."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from converters.gather import global_params, iter_hf_tensors, iter_lora_tensors
    from mcore_rl.models.lora import lora_of

    check_output_dir(out, force, inputs=(hf_side_dir,))
    inner = model.module if hasattr(model, "module") else model
    spec = inner.mcore_rl_spec
    params = global_params(inner)
    writer = None
    with removed_on_failure(staging_dir(out)) as tmp:
        if _rank0():
            index, tp = NameIndex(spec), ps.get_tensor_model_parallel_world_size()
            layout = []
            for e in params:
                rule, layer = index.mcore(e.global_name)
                layout += _hf_layout(rule, layer, e.shape, e.dtype, tp, spec)
            writer = _staged_writer(tmp, layout, shard_mb)
        n_hf = len(NameIndex(spec).all_hf_names())
        tensors = iter_hf_tensors(model, params=params)
        for name, tensor in tqdm(tensors, total=n_hf, desc="export", unit="tensor", disable=not (progress and _rank0())):
            if writer is not None:
                writer.add(name, tensor)
        lora = lora_of(inner)
        if lora is not None:
            adapters = {name: t.cpu() for name, t in iter_lora_tensors(model)}  # small: held whole on rank 0
            if _rank0():
                write_adapter(os.path.join(tmp, ADAPTER_DIR), adapters, lora_meta(lora), os.path.abspath(hf_side_dir))
        if _rank0():
            _finish_hf(writer, hf_side_dir, tmp, out)
    _barrier()
    return out


def _adapter_keys(spec: ArchSpec, tensors: dict, lora: dict | None) -> dict[str, list[tuple[str, str, Rule]]]:
    """{base rule's Megatron name: [(factor, sharded key, adapter rule)]} of a LoRA checkpoint's
    adapters, `factor` as ``(q_proj, lora_A)`` (layers stacked on the first axis, like the base)."""
    keys = sorted(k for k in tensors if is_lora(k))
    if not keys:
        return {}
    if lora is None:
        raise CheckpointError(f"the checkpoint holds LoRA adapters ({keys[0]}, ...) but its {META} has no `lora` "
                              f"entry (rank, alpha, targets)")
    found, used = {}, set()
    for rule in lora_rules(spec, lora["targets"]):
        key = rule.mcore.replace(f"{LAYER}.", "")
        if key not in tensors:
            raise CheckpointError(f"the checkpoint has no tensor for the adapter {rule.mcore}")
        linear, which, module = rule.mcore.rsplit(".", 2)  # <linear>_lora, lora_A, q_proj
        found.setdefault(linear.removesuffix(LORA) + ".weight", []).append(((module, which), key, rule))
        used.add(key)
    extra = sorted(set(keys) - used)
    if extra:
        raise CheckpointError(f"the checkpoint has adapters its LoRA targets {lora['targets']} do not name: {extra[:5]}")
    return found


def hf_order(spec: ArchSpec, key=lambda rule: None) -> list[tuple[str | None, int | None, Rule]]:
    """(key(rule), layer, rule) for every tensor of the model in HF order: what comes before the
    layers, each layer's tensors, what comes after."""
    pre, layers, post = [], [], []
    for rule in rules_for(spec):
        if rule.per_layer:
            layers.append((key(rule), rule))
        else:
            (post if layers else pre).append((key(rule), None, rule))
    return pre + [(k, i, rule) for i in range(spec.num_layers) for k, rule in layers] + post


def export_order(spec: ArchSpec, tensors: dict) -> list[tuple[str, int | None, Rule]]:
    """(sharded key, layer, rule) for every tensor of a converted checkpoint, in HF order.

    `tensors`: sharded key -> (global shape, dtype), as `streaming.checkpoint_tensors` reads
    them. A layer's tensors are stored under `decoder.layers.<name>` with the layers stacked on
    the first axis; local-spec layer norms are stored under their TransformerEngine names.
    """
    def key(rule: Rule) -> str:
        names = dict.fromkeys([rule.mcore_name(te=True), rule.mcore_name()])
        keys = [n.replace(f"{LAYER}.", "") for n in names]
        found = next((k for k in keys if k in tensors), None)
        if found is None:
            raise CheckpointError(f"the checkpoint has no tensor for {rule.mcore} (looked for {', '.join(keys)})")
        if rule.per_layer and tensors[found][0][0] != spec.num_layers:
            raise CheckpointError(f"{found} holds {tensors[found][0][0]} layers, config.json says {spec.num_layers}")
        return found

    order = hf_order(spec, key)
    extra = sorted(set(tensors) - {k for k, _, _ in order})
    if extra:
        raise CheckpointError(f"the checkpoint has tensors the {spec.family} mapping does not know: {extra[:5]}")
    return order


def mcore_to_hf(mcore_path: str, out: str, force: bool = False, shard_mb: int = 2048, progress: bool = True) -> str:
    """Converted checkpoint (any TP/PP) -> HF safetensors, one tensor in memory at a time.

    Runs in one process; under several ranks every rank reads the same tensors (the loads are
    collective) and rank 0 writes.
    """
    from mcore_rl.distributed import init_distributed

    meta_path = os.path.join(mcore_path, META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{mcore_path} is not a converted checkpoint (no {META})")
    check_output_dir(out, force, inputs=(mcore_path,))
    hf_side = os.path.join(mcore_path, "hf")
    spec = arch_from_hf_config(hf_side)
    ckpt = os.path.join(mcore_path, "model")
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"no megatron checkpoint at {ckpt}")
    with open(meta_path) as f:
        meta = json.load(f)
    lora = {**meta["lora"], "dtype": meta.get("dtype", "auto")} if meta.get("lora") else None
    init_distributed(1, 1)
    with unreadable_as_checkpoint_error(mcore_path):
        _write_hf(ckpt, spec, hf_side, out, shard_mb, progress, lora)
    return out


@contextlib.contextmanager
def unreadable_as_checkpoint_error(path: str):
    """A damaged file met while reading a checkpoint (torch's zip reader raises RuntimeError, a
    short pickle EOFError) is named as the checkpoint's problem, not a crash of the tool."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, CheckpointException) as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({last_line(e)}); is it complete?") from e


def last_line(e: BaseException) -> str:
    """The telling line of an exception (torch's checkpoint errors end with the rank's cause)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _write_hf(ckpt: str, spec: ArchSpec, hf_side: str, out: str, shard_mb: int, progress: bool,
              lora: dict | None = None) -> None:
    """The HF tensors of a converter checkpoint, in HF order; a LoRA checkpoint's adapted weights
    merged, and its adapters in peft's format in `out`/lora_adapter."""
    from tqdm import tqdm

    from converters.streaming import checkpoint_tensors, iter_checkpoint

    tensors = checkpoint_tensors(ckpt)
    adapters = _adapter_keys(spec, tensors, lora)
    base = {k: v for k, v in tensors.items() if not is_lora(k)}
    # a LoRA training checkpoint holds its adapters alone: the base is the HF model it started from
    reader = HFReader(lora["base_model"]) if adapters and not base else None
    if reader is not None:
        check_base(lora, lora["base_model"], f"checkpoint {os.path.dirname(ckpt)}")
    dtype = resolve_dtype(lora["dtype"], {}) if reader is not None else None
    order = hf_order(spec) if reader is not None else export_order(spec, base)
    writer = None
    with removed_on_failure(staging_dir(out)) as tmp:
        if _rank0():
            layout = []
            for key, layer, rule in order:
                if reader is not None:
                    layout += [(n, reader.shape(n), dtype) for n in rule.hf_names(layer)]
                    continue
                shape, dt = tensors[key]
                layout += _hf_layout(rule, layer, shape[1:] if layer is not None else shape, dt, 1, spec)
            writer = _staged_writer(tmp, layout, shard_mb)
        # each adapted weight is read together with its adapters (A, B of each targeted module)
        reads = []
        for key, layer, rule in order:
            reads += ([] if reader is not None else [(key, layer)]) + [(k, layer) for _, k, _ in adapters.get(rule.mcore, [])]
        loaded = iter_checkpoint(ckpt, reads, tensors)
        peft_tensors = {}
        for _, layer, rule in tqdm(order, total=len(order), desc="export", unit="tensor",
                                   disable=not (progress and _rank0())):
            if reader is not None:
                hf = [reader.get(n).to(dtype) for n in rule.hf_names(layer)]
            else:
                hf = mapping_mcore_to_hf(rule, [next(loaded)[2]], spec)
            own = {}
            for factor, _, arule in adapters.get(rule.mcore, []):
                (name,), (x,) = arule.hf_names(layer), mapping_mcore_to_hf(arule, [next(loaded)[2]], spec)
                peft_tensors[name] = own[factor] = x
            names = rule.hf_names(layer)
            for i, name in enumerate(names):
                module = hf_module(name)
                if (module, "lora_A") in own:
                    hf[i] = merge(hf[i], own[(module, "lora_A")], own[(module, "lora_B")], lora["alpha"] / lora["rank"])
            if writer is not None:
                for name, x in zip(names, hf):
                    writer.add(name, x)
            del hf, own
        _barrier()
        if _rank0():
            if adapters:
                write_adapter(os.path.join(tmp, ADAPTER_DIR), peft_tensors, lora, lora.get("base_model", ""))
            _finish_hf(writer, hf_side, tmp, out)
    _barrier()
