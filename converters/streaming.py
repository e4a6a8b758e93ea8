"""Megatron `dist_checkpointing` checkpoints written and read one tensor at a time.

Writing (HF -> Megatron): each rank builds its TP/PP shard of the model on the meta device
(shapes, no storage) and hands its `sharded_state_dict()` to `dist_checkpointing.save` with
`StreamingSaveStrategy`. That strategy writes the same `torch_dist` format as megatron's
default one (torch DCP files + `.metadata`; megatron adds `metadata.json` and `common.pt`), so
`dist_checkpointing.load` reads it at any TP/PP. The difference is when the tensor data
exists: megatron's writer stages every tensor of the rank before writing the first byte;
here torch DCP asks the planner for each write item's data just before writing it
(`resolve_data`), and the planner produces that one parameter from the HF checkpoint through
the mapping, then lets it go. Each write item goes to its own file (torch's
`FileSystemWriter(single_file_per_rank=False)`): with one file per rank, torch's writer keeps
every item of the file alive until the file is complete.

Reading (Megatron -> HF): `iter_checkpoint` requests one tensor (one layer's slab of a stacked
layer tensor) at a time from `dist_checkpointing.load`, which reads only the stored chunks the
request overlaps, so a checkpoint written at any TP/PP reads the same way.

Peak memory is a few copies of one parameter (the HF tensors a rule needs and the Megatron
shard made from them, or a stored chunk and its copy), whatever the model size.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterator

import torch

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
# megatron-core 0.19 replaces any save strategy that is not a TorchDistSaveShardedStrategy
# with the default one, so this subclasses it (0.16 accepts any SaveShardedStrategy).
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy


def _sharded_tensors(x) -> Iterator[ShardedTensor]:
    """ShardedTensors in a (possibly nested) factory build result."""
    if isinstance(x, ShardedTensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _sharded_tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _sharded_tensors(v)


class _Sources:
    """(sharded key, global offset) -> the data of that write item, produced on demand.

    `produce(param_name)` returns the full local tensor of one parameter of this rank's shard;
    ShardedTensorFactories (e.g. SwiGLU's fc1, saved as separate gate and up pieces) are
    rebuilt on the real tensor to cut the piece out, exactly as megatron cuts it when saving a
    live model. The last parameter is kept so that the pieces of one parameter cost one read.
    """

    def __init__(self, sharded_state_dict: dict, produce: Callable[[str], torch.Tensor]):
        self.produce = produce
        self.where: dict[tuple, tuple[str, ShardedTensorFactory | None]] = {}
        for name, v in sharded_state_dict.items():
            if isinstance(v, ShardedTensor):
                self.where[(v.key, tuple(v.global_offset))] = (name, None)
            elif isinstance(v, ShardedTensorFactory):
                for piece in _sharded_tensors(copy.copy(v).build()):
                    self.where[(piece.key, tuple(piece.global_offset))] = (name, v)
            elif not isinstance(v, ShardedObject):
                raise TypeError(f"cannot stream {name!r}: unexpected {type(v).__name__} in the sharded state dict")
        self._last: tuple[str, torch.Tensor] | None = None

    def _param(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous parameter before producing the next
            self._last = (name, self.produce(name))
        return self._last[1]

    def data(self, key: str, offset: tuple, sizes) -> torch.Tensor:
        name, factory = self.where[(key, tuple(offset))]
        t = self._param(name)
        if factory is not None:
            f = copy.copy(factory)
            f.data = t
            t = next(p.data for p in _sharded_tensors(f.build())
                     if p.key == key and tuple(p.global_offset) == tuple(offset))
        return t.reshape(sizes).contiguous()

    def done(self) -> None:
        self._last = None


def _lazy_planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazySavePlanner(MCoreSavePlanner):
        """MCoreSavePlanner whose tensor data is produced when torch DCP writes the item."""

        def __init__(self, sources: _Sources, progress: bool = False, **kw):
            super().__init__(**kw)
            self.sources, self.progress, self.bar = sources, progress, None

        def finish_plan(self, new_plan):
            plan = super().finish_plan(new_plan)
            if self.progress:
                from tqdm import tqdm

                n = sum(item.type != WriteItemType.BYTE_IO for item in plan.items)
                self.bar = tqdm(total=n, desc="convert", unit="tensor")
            return plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            data = self.sources.data(write_item.index.fqn, write_item.index.offset, write_item.tensor_data.chunk.sizes)
            if self.bar is not None:
                self.bar.update()
            return data

        def close(self):
            if self.bar is not None:
                self.bar.close()

    return LazySavePlanner


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """`torch_dist` save whose tensors are produced one write item at a time (see module doc).

    `sharded_state_dict` must be the one `sources` was built from (typically a meta-device
    model's `sharded_state_dict()`); its tensors' data are never read.
    """

    def __init__(self, sources: _Sources, progress: bool = False):
        super().__init__("torch_dist", 1)
        self.sources, self.progress = sources, progress

    @property
    def can_handle_sharded_objects(self):
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.strategies.torch import (
            _replace_state_dict_keys_with_sharded_keys,
            mcore_to_pyt_state_dict,
        )

        grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state_dict = mcore_to_pyt_state_dict(grouped, False)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=1)
        planner = _lazy_planner_class()(self.sources, progress=self.progress, dedup_replicated_tensors=False,
                                        flatten_state_dict=False)
        try:
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)
        finally:
            planner.close()
            self.sources.done()


def save_streaming(meta_model, produce: Callable[[str], torch.Tensor], ckpt_dir: str, progress: bool = False) -> None:
    """Collective: write `meta_model`'s checkpoint with each parameter's data from `produce`
    (parameter name -> this rank's full tensor of it)."""
    from megatron.core import dist_checkpointing

    sharded = meta_model.sharded_state_dict()
    strategy = StreamingSaveStrategy(_Sources(sharded, produce), progress=progress)
    dist_checkpointing.save(sharded, ckpt_dir, sharded_strategy=strategy)


def checkpoint_tensors(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Sharded key -> (global shape, dtype) of every tensor in a checkpoint (reads `.metadata` only)."""
    from megatron.core import dist_checkpointing

    return {k: (tuple(v.global_shape), v.dtype) for k, v in dist_checkpointing.load_tensors_metadata(ckpt_dir).items()}


def iter_checkpoint(ckpt_dir: str, keys: list[tuple[str, int | None]],
                    meta: dict | None = None) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """Yield (sharded key, layer, full tensor) for each requested (key, layer), reading one tensor
    at a time from a checkpoint saved at any TP/PP (only the chunks it overlaps are read).

    Megatron stores the layers of a transformer block stacked on a leading axis: key
    `decoder.layers.<rest>` of global shape (num_layers, ...); `layer` picks one slab of it.
    """
    from megatron.core import dist_checkpointing

    meta = meta if meta is not None else checkpoint_tensors(ckpt_dir)
    for key, layer in keys:
        if key not in meta:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {ckpt_dir}")
        shape, dtype = meta[key]
        if layer is None:
            request = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype))
        else:
            request = ShardedTensor.from_rank_offsets(key, torch.empty((1, *shape[1:]), dtype=dtype),
                                                      (0, layer, shape[0]))
        with warnings.catch_warnings():  # megatron-core's own call into torch DCP is deprecated there
            warnings.filterwarnings("ignore", message=".*load_state_dict. is deprecated", category=FutureWarning)
            # a partial request: skip the check that the requests of all ranks cover every tensor
            loaded = dist_checkpointing.load({key: request}, ckpt_dir, validate_access_integrity=False)
        t = loaded.pop(key)
        yield key, layer, (t[0] if layer is not None else t)
        del t, loaded, request
