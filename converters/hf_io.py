"""Reading and writing HuggingFace safetensors checkpoints, one tensor at a time.

`HFReader` opens a checkpoint (single file or sharded with an index) lazily: a tensor is
read from disk only when asked for, so loading a TP/PP shard touches only its slices.
`HFWriter` writes shards of bounded size plus `model.safetensors.index.json`, flushing as
it goes. `load_hf_into_model` is the in-memory path: HF weights straight into this rank's
live TP/PP shard of a megatron model.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from converters.mapping import NameIndex, hf_to_mcore
from mcore_rl.models.arch import ArchSpec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files a converted checkpoint carries along so that it is usable on its own.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
              "added_tokens.json")


class CheckpointError(RuntimeError):
    pass


class HFReader:
    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, object] = {}  # one open file per shard, reused across tensors
        index, single = os.path.join(path, INDEX), os.path.join(path, SINGLE)
        if os.path.exists(index):
            with open(index) as f:
                self.files = json.load(f)["weight_map"]
        elif os.path.exists(single):
            self.files = {k: SINGLE for k in self._open(SINGLE).keys()}
        else:
            raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE} or {INDEX})")

    def _open(self, fname: str):
        if fname not in self._handles:
            full = os.path.join(self.path, fname)
            if not os.path.exists(full):
                raise CheckpointError(f"missing safetensors file {full} (named in {INDEX})")
            try:
                handle = safe_open(full, framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"corrupt safetensors file {full}: {e}") from e
            self._handles[fname] = handle
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        try:
            return self._open(self.files[name]).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"corrupt tensor {name!r} in {os.path.join(self.path, self.files[name])}: {e}") from e


class HFWriter:
    """Writes named tensors into `model-0000i-of-0000N.safetensors` shards of ~`shard_mb`."""

    def __init__(self, out_dir: str, shard_mb: int = 2048):
        self.out_dir, self.limit = out_dir, shard_mb * 2**20
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()
        self.total += t.numel() * t.element_size()
        if self.pending_bytes >= self.limit:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        n = len(self.shards)
        save_file(self.pending, os.path.join(self.out_dir, f"part-{n}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n, weight_map = len(self.shards), {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, f"part-{i}.safetensors"), os.path.join(self.out_dir, final))
            weight_map.update({k: final for k in names})
        with open(os.path.join(self.out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)


def copy_side_files(src: str, dst: str) -> None:
    for name in SIDE_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def global_layer_offset(model) -> int:
    """Global index of this PP stage's first layer (megatron numbers layers from 1)."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return layers[0].layer_number - 1 if layers is not None and len(layers) else 0


def local_to_global(name: str, offset: int) -> str:
    """`decoder.layers.3.x` on a stage whose first layer is 8 -> `decoder.layers.11.x`."""
    if offset and name.startswith("decoder.layers."):
        _, _, idx, tail = name.split(".", 3)
        return f"decoder.layers.{int(idx) + offset}.{tail}"
    return name


def load_hf_into_model(model, spec: ArchSpec, hf_path: str | HFReader, te: bool = False) -> None:
    """Copy HF weights into this rank's shard of `model` (any TP/PP), reading only what it needs."""
    from megatron.core import parallel_state as ps

    reader = hf_path if isinstance(hf_path, HFReader) else HFReader(hf_path)
    index = NameIndex(spec, te=te)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    offset = global_layer_offset(model)
    role = getattr(model, "mcore_rl_role", "actor")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if role == "critic" and name.startswith("output_layer."):
                continue  # the value head is new; it has no HF counterpart
            if name == "output_layer.weight" and spec.tied_embeddings:
                name = "embedding.word_embeddings.weight"  # a last PP stage's copy of the tied weight
            rule, layer = index.mcore(local_to_global(name, offset))
            shard = hf_to_mcore(rule, [reader.get(n) for n in rule.hf_names(layer)], spec, tp_rank, tp)
            if shard.shape != param.shape:
                raise CheckpointError(f"{name}: checkpoint gives shape {tuple(shard.shape)}, model expects {tuple(param.shape)}")
            param.copy_(shard)
