"""The training data: the rows of a split (token shards, and the cache shards that match them row for row), the
batches drawn from them, and the seeded sampler whose whole state is a position in one endless stream, so a resumed
run draws exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stackwise_cli.curricula import trained_together
from stackwise_cli.errors import ProjectError, StackwiseError
from stackwise_cli.store.manifest import Manifest, StackEntry
from stackwise_cli.store.project import Project
from stackwise_cli.store.shards import HiddenShard, TokenShard, read_token_shard


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64
    hidden: torch.Tensor | None  # (B, T, d_model) float32: the cached states entering the stack, if any
    seq_ids: np.ndarray  # (B,) the sequences' stable ids: masks are a function of them
    epochs: np.ndarray  # (B,) the epoch each row was drawn in: a new epoch, new masks


class Sequences:
    """The rows of one split: token shards, and (optionally) the cache shards that match them row for row."""

    def __init__(self, tokens: list[TokenShard], hidden: list[HiddenShard] | None = None):
        if hidden is not None:
            for i, (t, h) in enumerate(zip(tokens, hidden, strict=True)):
                if not np.array_equal(np.asarray(t.seq_ids), np.asarray(h.seq_ids)):
                    raise StackwiseError(f"cache shard {i} does not hold the same sequences as token shard {i}")
        self.tokens, self.hidden = tokens, hidden
        self.starts = np.cumsum([0] + [len(t.seq_ids) for t in tokens])  # global row -> shard by searchsorted

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, rows: np.ndarray, device: torch.device, epochs: np.ndarray | None = None) -> Batch:
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        toks, hids, ids = [], [], []
        for r, s in zip(rows, shard_of):
            local = int(r - self.starts[s])
            toks.append(np.asarray(self.tokens[s].tokens[local]))
            ids.append(int(self.tokens[s].seq_ids[local]))
            if self.hidden is not None:
                hids.append(self.hidden[s].hidden[local])
        tokens = torch.from_numpy(np.stack(toks).astype(np.int64)).to(device)
        hidden = torch.stack(hids).to(device, torch.float32) if hids else None
        epochs = np.zeros(len(rows), dtype=np.int64) if epochs is None else epochs
        return Batch(tokens, hidden, np.asarray(ids, dtype=np.int64), epochs)


class Sampler:
    """Shuffled batches without replacement from one endless seeded stream: epoch e is a permutation of the split
    seeded by (``train.seed``, e), and the stream is epoch 0, epoch 1, ... one after the other. ``start`` is where a
    run begins in that stream (in sequences): a stack trained after others starts where they stopped, so stacks
    trained one after another read consecutive, disjoint slices of the data, as one end-to-end run of their total
    length does (docs/training.md, "What each stack sees"). The whole state is the position (epoch, offset), so a
    resumed run draws exactly the batches the uninterrupted run would have. The permutation of the current epoch is
    computed once, when the stream enters it, not per batch: drawing a batch costs O(batch size)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if n < batch_size:
            raise ProjectError(
                f"the split holds {n} sequences, fewer than train.batch_size ({batch_size})",
                hint="lower train.batch_size or prepare more text",
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = divmod(start, n)
        self.last_epochs = np.zeros(0, dtype=np.int64)  # the epoch of each row of the last batch
        self.permutations = 0  # how many epoch permutations were computed (each O(n)); tests count them
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
            self.permutations += 1
        return self._perm

    def next(self) -> np.ndarray:
        out, epochs, need = [], [], self.batch_size
        while need:
            take = min(need, self.n - self.offset)
            out.append(self._permutation()[self.offset : self.offset + take])
            epochs.append(np.full(take, self.epoch, dtype=np.int64))
            self.offset += take
            need -= take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        self.last_epochs = np.concatenate(epochs)
        return np.concatenate(out)

    def position(self) -> int:
        """Sequences drawn from the start of the stream (all runs before this one included)."""
        return self.epoch * self.n + self.offset

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.n:
            raise StackwiseError(
                f"the checkpoint's data position (epoch {epoch}, offset {offset}) does not fit a split of {self.n} "
                "sequences: it was made on other data",
                hint="use --resume never to start again",
            )
        self.epoch, self.offset = epoch, offset


def stream_start(m: Manifest, before: list[StackEntry]) -> int:
    """Where a run begins in the train split's sample stream: after every sequence the runs recorded on the stack
    entries ``before`` drew (each run draws its ``tokens / data.seq_len`` sequences in turn; the stacks of one
    end-to-end run share it, so it counts once)."""
    runs = [e.tokens for e in before if not trained_together(e.trained_by)]
    runs.append(max((e.tokens for e in before if trained_together(e.trained_by)), default=0))
    return sum(runs) // m.data.seq_len


def token_data(project: Project, m: Manifest) -> list[TokenShard]:
    return [
        read_token_shard(project.path(s.file), expect_seq_len=m.data.seq_len) for s in m.data.splits["train"].shards
    ]


def val_data(project: Project, m: Manifest) -> Sequences:
    """The validation split's rows, for ``train.eval_every`` (scored from the first, ``eval.max_sequences`` of them)."""
    return Sequences(
        [read_token_shard(project.path(s.file), expect_seq_len=m.data.seq_len) for s in m.data.splits["val"].shards]
    )
