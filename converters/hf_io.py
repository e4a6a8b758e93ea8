"""Reading and writing HuggingFace safetensors checkpoints, one tensor at a time.

`HFReader` opens a checkpoint (single file or sharded with an index) lazily and reads a
tensor from disk only when asked for, with plain positioned reads into a fresh tensor (no
memory map: a mapped file's pages would stay resident in the process as it is read, so
reading a whole model would leave the model's size in RSS). Loading a TP/PP shard touches
only the tensors it needs. `HFWriter` writes `model-0000i-of-0000N.safetensors` shards of
bounded size plus `model.safetensors.index.json`; told the tensors up front (`tensors=`) it
lays the files out first and writes each tensor to its place as it arrives, holding nothing.
`load_hf_into_model` is the in-memory path: HF weights straight into this rank's live TP/PP
shard of a megatron model.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch

from converters.mapping import NameIndex, hf_counterpart, hf_to_mcore, is_lora
from mcore_rl.models.arch import ArchSpec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files a converted checkpoint carries along so that it is usable on its own.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
              "added_tokens.json")

# safetensors dtype names <-> torch dtypes
ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
             "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
             "F64": torch.float64}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
                     ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class CheckpointError(RuntimeError):
    pass


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _SafetensorsFile:
    """One safetensors file: its header, and positioned reads of single tensors."""

    def __init__(self, path: str):
        self.path = path
        self._f = None
        try:
            self._f = open(path, "rb", buffering=0)
            size = os.fstat(self._f.fileno()).st_size
            raw = self._f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(self._f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            header.pop("__metadata__", None)
            self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
            for name, info in header.items():
                dtype = ST_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']!r}")
                shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
                if end - begin != _nbytes(shape, dtype) or begin < 0 or 8 + n + end > size:
                    raise ValueError(f"tensor {name!r}: data offsets {begin}..{end} do not fit its shape "
                                     f"{list(shape)} {info['dtype']} or the file")
                self.tensors[name] = (dtype, shape, 8 + n + begin)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            if self._f is not None:
                self._f.close()
            raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, offset = self.tensors[name]
        t = torch.empty(shape, dtype=dtype)
        buf, done = _as_bytes(t), 0
        while done < len(buf):
            n = os.preadv(self._f.fileno(), [buf[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"corrupt tensor {name!r} in {self.path}: file ends early")
            done += n
        return t


class HFReader:
    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, _SafetensorsFile] = {}  # one open file per shard, reused across tensors
        index, single = os.path.join(path, INDEX), os.path.join(path, SINGLE)
        if os.path.exists(index):
            with open(index) as f:
                self.files = json.load(f)["weight_map"]
        elif os.path.exists(single):
            self.files = {k: SINGLE for k in self._open(SINGLE).tensors}
        else:
            raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE} or {INDEX})")

    def _open(self, fname: str) -> _SafetensorsFile:
        if fname not in self._handles:
            full = os.path.join(self.path, fname)
            if not os.path.exists(full):
                raise CheckpointError(f"missing safetensors file {full} (named in {INDEX})")
            self._handles[fname] = _SafetensorsFile(full)
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header (no data read)."""
        return self._open(self.files[name]).tensors[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        handle = self._open(self.files[name])
        if name not in handle.tensors:
            raise CheckpointError(f"tensor {name!r} is not in {handle.path} (where {INDEX} says it is)")
        return handle.read(name)


class HFWriter:
    """Writes named tensors into `model-0000i-of-0000N.safetensors` shards of ~`shard_mb` each.

    With `tensors` (name, shape, dtype) given up front, the shards and their headers are laid
    out at once and `add` writes each tensor's bytes straight to its place in its file, in any
    order; nothing is held. Without it, tensors are kept until a shard's worth has arrived.
    A shard is closed once it holds `shard_mb` or more (0: one tensor per file).
    """

    def __init__(self, out_dir: str, shard_mb: int = 2048, tensors=None):
        self.out_dir, self.limit = out_dir, shard_mb * 2**20
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0
        self.layout: dict[str, tuple[str, int, tuple, torch.dtype]] | None = None
        if tensors is not None:
            self._lay_out([(n, tuple(s), d) for n, s, d in tensors])

    def _lay_out(self, tensors) -> None:
        groups, size = [[]], 0
        for name, shape, dtype in tensors:
            if dtype not in ST_NAMES:
                raise CheckpointError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            if groups[-1] and size >= self.limit:
                groups.append([])
                size = 0
            groups[-1].append((name, shape, dtype))
            size += _nbytes(shape, dtype)
        self.layout, self._fds, self._written = {}, [], set()
        n = len(groups)
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, pos = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype in group:
                end = pos + _nbytes(shape, dtype)
                header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, end]}
                pos = end
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
            fd = os.open(os.path.join(self.out_dir, fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, 8 + len(raw) + pos)
            self._fds.append(fd)
            base = 8 + len(raw)
            for name, shape, dtype in group:
                self.layout[name] = (i, base + header[name]["data_offsets"][0], shape, dtype)
            self.shards.append([name for name, _, _ in group])
            self.total += pos

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if self.layout is None:
            self.pending[name] = t
            self.pending_bytes += t.numel() * t.element_size()
            self.total += t.numel() * t.element_size()
            if self.pending_bytes >= self.limit:
                self._flush()
            return
        if name not in self.layout:
            raise CheckpointError(f"tensor {name!r} was not declared to the writer")
        i, offset, shape, dtype = self.layout[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(f"{name}: declared {list(shape)} {dtype}, got {list(t.shape)} {t.dtype}")
        buf, done = _as_bytes(t), 0
        while done < len(buf):
            done += os.pwrite(self._fds[i], buf[done:], offset + done)
        self._written.add(name)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        n = len(self.shards)
        save_file(self.pending, os.path.join(self.out_dir, f"part-{n}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        n, weight_map = len(self.shards), {}
        if self.layout is None:
            self._flush()
            n = len(self.shards)
            for i in range(n):
                os.replace(os.path.join(self.out_dir, f"part-{i}.safetensors"),
                           os.path.join(self.out_dir, f"model-{i + 1:05d}-of-{n:05d}.safetensors"))
        else:
            missing = [k for k in self.layout if k not in self._written]
            for fd in self._fds:
                os.fsync(fd)
                os.close(fd)
            self._fds = []
            if missing:
                raise CheckpointError(f"{len(missing)} declared tensors were never written, e.g. {missing[:3]}")
        for i, names in enumerate(self.shards):
            weight_map.update({k: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for k in names})
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


class ShardSource:
    """This rank's shard of each Megatron parameter, made from the HF checkpoint on demand.

    `shard(name, shape, dtype)`: `name` is the rank-local parameter name of a model whose
    PP stage starts at global layer `layer_offset`. Reads only the HF tensors the rule names.
    """

    def __init__(self, spec: ArchSpec, hf_path: str | HFReader, tp_rank: int, tp_size: int, layer_offset: int,
                 te: bool = False):
        self.spec, self.tp_rank, self.tp_size, self.offset = spec, tp_rank, tp_size, layer_offset
        self.reader = hf_path if isinstance(hf_path, HFReader) else HFReader(hf_path)
        self.index = NameIndex(spec, te=te)

    def shard(self, name: str, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        rule, layer = self.index.mcore(local_to_global(hf_counterpart(name, self.spec), self.offset))
        hf = [self.reader.get(n) for n in rule.hf_names(layer)]
        shard = hf_to_mcore(rule, hf, self.spec, self.tp_rank, self.tp_size)
        if tuple(shard.shape) != tuple(shape):
            raise CheckpointError(f"{name}: checkpoint gives shape {tuple(shard.shape)}, model expects {tuple(shape)}")
        return shard if dtype is None else shard.to(dtype)


def shard_source(model, spec: ArchSpec, hf_path: str | HFReader, te: bool = False) -> ShardSource:
    """A `ShardSource` for this rank's TP/PP shard `model` (call after `init_distributed`)."""
    from megatron.core import parallel_state as ps

    return ShardSource(spec, hf_path, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                       global_layer_offset(model), te=te)


def load_hf_into_model(model, spec: ArchSpec, hf_path: str | HFReader, te: bool = False) -> None:
    """Copy HF weights into this rank's shard of `model` (any TP/PP), reading only what it needs;
    LoRA adapters are not part of the base checkpoint (`mcore_rl.models.lora.load_adapters`)."""
    source = shard_source(model, spec, hf_path, te=te)
    role = getattr(model, "mcore_rl_role", "actor")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if hf_counterpart(name, spec, role) is not None and not is_lora(name):
                param.copy_(source.shard(name, param.shape))
