"""`PromptLoader`: the prompts of each training step, shuffled per epoch and sharded over DP ranks.

Every rank computes the same global order (a permutation seeded by (seed, epoch)), cuts the same
global batch of `train_batch_size` prompts and keeps its contiguous slice. No communication is
needed, the shards are disjoint and cover the global batch, and the position is a property of the
global batch only, so a run resumed with another DP size still continues at the same prompt.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class PromptLoader:
    """Batches of prompts, one per step, forever (`trainer.max_steps` ends a run).

    The last incomplete global batch of an epoch is dropped, so every step has a full batch on
    every rank (PPO/GRPO statistics and DP collectives assume equal shapes).
    """

    def __init__(self, dataset: Sequence, train_batch_size: int, seed: int = 0, shuffle: bool = True,
                 dp_rank: int = 0, dp_size: int = 1):
        if train_batch_size <= 0:
            raise ValueError(f"train_batch_size must be positive, got {train_batch_size}")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad DP layout: dp_rank={dp_rank}, dp_size={dp_size}")
        if train_batch_size % dp_size:
            raise ValueError(f"train_batch_size={train_batch_size} is not divisible by dp_size={dp_size}")
        if len(dataset) < train_batch_size:
            raise ValueError(f"the dataset has {len(dataset)} prompts, fewer than train_batch_size={train_batch_size}")
        self.dataset = dataset
        self.train_batch_size = train_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.epoch = 0
        self.position = 0  # global batches already served in this epoch
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.train_batch_size

    @property
    def local_batch_size(self) -> int:
        return self.train_batch_size // self.dp_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices in `epoch`'s order: the same on every rank and in every rerun."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        # PCG64 with a (seed, epoch) key: stable across numpy versions and independent per epoch.
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def global_batch_indices(self, epoch: int, position: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        start = position * self.train_batch_size
        return self._order[start : start + self.train_batch_size]

    def next_batch(self) -> list:
        """This rank's prompts for the next step (a new epoch, reshuffled, after the last full batch)."""
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        idx = self.global_batch_indices(self.epoch, self.position)
        local = idx[self.dp_rank * self.local_batch_size : (self.dp_rank + 1) * self.local_batch_size]
        self.position += 1
        return [self.dataset[int(i)] for i in local]

    def state_dict(self) -> dict:
        """Where the next batch starts; the dataset size and batch size are kept to catch a changed setup."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "train_batch_size": self.train_batch_size, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved prompt. A different seed, batch size or dataset would silently change
        which prompts come next, so those are errors; the DP size may differ."""
        for key, mine in (("seed", self.seed), ("train_batch_size", self.train_batch_size),
                          ("dataset_size", len(self.dataset))):
            if key in state and state[key] != mine:
                raise ValueError(f"PromptLoader state has {key}={state[key]} but this loader has {mine}; "
                                 "resuming would not continue at the same prompt")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
