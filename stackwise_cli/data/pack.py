"""Packing: documents -> tokens -> fixed-length sequences -> train/val token shards.

Each document is tokenized, followed by EOS, and appended to its split's token stream; the stream is cut into
sequences of exactly ``seq_len`` tokens (so a sequence may span documents, as in GPT-2 style pretraining) and
the sequences are written in shards. Which split each document (or chunk of one) goes to is decided before, by
``data/split.py``; here every val sequence that occurs verbatim anywhere in the train token stream is dropped, so
the val loss is never scored on text the model trained on.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from stackwise_cli.data.corpus import Document
from stackwise_cli.data.split import Split
from stackwise_cli.data.tokenizer import eos_id, text_encoder
from stackwise_cli.errors import DataError
from stackwise_cli.store.files import atomic_replace_dir, tmp_name
from stackwise_cli.store.project import Project
from stackwise_cli.store.shards import read_token_shard, write_token_shard

log = logging.getLogger(__name__)

SPLITS: tuple[Split, ...] = ("train", "val")
# Documents tokenized per encode_batch call: large enough for the tokenizer's thread pool to pay off, small enough
# that the batch's tokens stay a small fraction of a shard.
_BATCH_DOCS = 256
_BATCH_BYTES = 4 << 20


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the project root, e.g. "data/train/00000.arrow"
    sequences: int
    tokens: int
    sha256: str


class _SplitWriter:
    """Accumulates one split's token stream and writes a shard each time a full one is available.

    ``hold``: keep the whole stream in memory and write it only in ``finish``, after sequences are dropped (val:
    its sequences that also occur in train are known only once train is complete)."""

    def __init__(
        self, split: Split, folder: Path, rel_folder: str, seq_len: int, sequences_per_shard: int, hold: bool = False
    ):
        self.split = split
        self.folder = folder  # where shards are written now (a staging folder)
        self.rel_folder = rel_folder  # where they will live, relative to the project root
        self.seq_len = seq_len
        self.shard_tokens = seq_len * sequences_per_shard
        self.hold = hold
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.total_tokens = 0  # all tokens of the split, including the dropped tail
        self.next_seq_id = 0
        self.shards: list[ShardInfo] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.total_tokens += len(ids)
        if self.pending_tokens >= self.shard_tokens and not self.hold:
            stream = np.concatenate(self.pending)
            n_full = len(stream) // self.shard_tokens
            for i in range(n_full):
                self._write(stream[i * self.shard_tokens : (i + 1) * self.shard_tokens])
            rest = stream[n_full * self.shard_tokens :]
            self.pending = [rest]
            self.pending_tokens = len(rest)

    def sequences(self) -> np.ndarray:
        """(N, T) the complete sequences not yet written; the tail shorter than seq_len is dropped, so every
        sequence has exactly seq_len tokens."""
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=np.int32)
        n_seq = len(stream) // self.seq_len
        return stream[: n_seq * self.seq_len].reshape(n_seq, self.seq_len)

    def finish(self, keep: np.ndarray | None = None) -> None:
        """Write what is pending; ``keep`` (N,) bool selects which of ``sequences()`` are written."""
        seqs = self.sequences()
        if keep is not None:
            seqs = seqs[keep]
        step = self.shard_tokens // self.seq_len
        for i in range(0, len(seqs), step):
            self._write(seqs[i : i + step].reshape(-1))
        self.pending, self.pending_tokens = [], 0

    def _write(self, stream: np.ndarray) -> None:
        seqs = stream.reshape(-1, self.seq_len)  # (N, T)
        name = f"{len(self.shards):05d}.arrow"
        digest = write_token_shard(self.folder / name, seqs, first_seq_id=self.next_seq_id)
        self.shards.append(ShardInfo(f"{self.rel_folder}/{name}", len(seqs), seqs.size, digest))
        self.next_seq_id += len(seqs)
        log.debug("wrote %s/%s: %d sequences", self.rel_folder, name, len(seqs))


# ------------------------------------------------------------------------------ val sequences found in train

_B = np.uint64(0x100000001B3)  # odd, so invertible mod 2**64: window hashes at any offset can be aligned
_B_INV = np.uint64(pow(0x100000001B3, -1, 2**64))


def _token_code(t: np.ndarray) -> np.ndarray:
    """Each token id as a well-mixed 64-bit value (splitmix64's finaliser), so that the polynomial hash below
    does not see the small, structured integers ids are."""
    with np.errstate(over="ignore"):
        x = t.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _powers(base: np.uint64, n: int) -> np.ndarray:
    p = np.full(n, base, dtype=np.uint64)
    p[0] = 1
    return np.cumprod(p, dtype=np.uint64)  # wraps mod 2**64, as intended


def _window_hashes(stream: np.ndarray, n: int) -> np.ndarray:
    """(len - n + 1,) hash of every run of ``n`` consecutive tokens: sum_j code(t[i + j]) * B**j mod 2**64, from
    prefix sums in O(len) (Rabin-Karp without the division, which B's inverse replaces)."""
    with np.errstate(over="ignore"):
        weighted = _token_code(stream) * _powers(_B, len(stream))
        prefix = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(weighted, dtype=np.uint64)])
        m = len(stream) - n + 1
        return (prefix[n:] - prefix[:m]) * _powers(_B_INV, m)


def _found_in(seqs: np.ndarray, shards: list[Path]) -> np.ndarray:
    """(N,) bool: which rows of ``seqs`` (N, T) occur verbatim as T consecutive tokens anywhere in the token
    stream of the token ``shards`` files, in order (across sequence and shard boundaries). Hash matches are
    confirmed token by token, so a hash collision never drops a sequence."""
    found = np.zeros(len(seqs), dtype=bool)
    if not len(seqs) or not shards:
        return found
    n = seqs.shape[1]
    with np.errstate(over="ignore"):
        wanted = (_token_code(seqs) * _powers(_B, n)[None, :]).sum(axis=1, dtype=np.uint64)  # (N,)
    rows_of: dict[int, list[int]] = defaultdict(list)
    for i, h in enumerate(wanted.tolist()):
        rows_of[h].append(i)
    carry = np.zeros(0, dtype=np.int32)  # the last n - 1 tokens of the stream so far: windows span shards
    for path in shards:
        stream = np.concatenate([carry, read_token_shard(path).tokens.reshape(-1)])
        if len(stream) >= n:
            hashes = _window_hashes(stream, n)
            for pos in np.flatnonzero(np.isin(hashes, wanted)).tolist():
                for i in rows_of[int(hashes[pos])]:
                    if not found[i] and np.array_equal(stream[pos : pos + n], seqs[i]):
                        found[i] = True
        carry = stream[-(n - 1) :] if n > 1 else stream[:0]
    return found


def _batches(units: Iterable[tuple[Document, Split]]) -> Iterator[list[tuple[Document, Split]]]:
    batch: list[tuple[Document, Split]] = []
    size = 0
    for unit in units:
        batch.append(unit)
        size += len(unit[0].text)
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclass(frozen=True)
class Packed:
    shards: dict[str, list[ShardInfo]]  # split -> its shards
    val_overlap_sequences: int  # val sequences dropped because they occur verbatim in the train stream


def pack_corpus(
    units: Iterable[tuple[Document, Split]],
    tok: Tokenizer,
    *,
    seq_len: int,
    sequences_per_shard: int,
    project_root: Path,
    on_document: Callable[[int], None] | None = None,
    eos: int | None = None,
) -> Packed:
    """Tokenize each (document, split) of ``units`` and write ``data/train/*.arrow`` and ``data/val/*.arrow``
    under ``project_root``; val sequences that occur verbatim in the train stream are dropped.

    Streams train: at most one shard of train tokens plus one batch of documents is held in memory, and val (a
    small share) whole. Sequence ids run 0, 1, 2, ... through each split's shards. ``on_document(n_bytes)`` is
    called after each document with its UTF-8 size, for a progress bar.

    Shards are written into staging folders that replace ``data/<split>/`` only once both splits are complete,
    so a failure or a kill leaves the previous data untouched (and no stale shards of an earlier, longer run).
    """
    project = Project(project_root)
    eos = eos_id(tok) if eos is None else eos  # None: <|endoftext|>; a Hugging Face tokenizer names its own
    writers: dict[str, _SplitWriter] = {}
    for split in SPLITS:
        staging = tmp_name(project.path(project.split_dir(split)))
        staging.mkdir(parents=True)
        writers[split] = _SplitWriter(
            split, staging, project.split_dir(split), seq_len, sequences_per_shard, hold=split == "val"
        )
    try:
        eos_arr = np.array([eos], dtype=np.int32)
        # Special tokens spelled out in the text stay text: a corpus that mentions <|endoftext|> gets no spurious
        # document break, one that mentions [MASK] no mask-token targets.
        enc = text_encoder(tok)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets that packing has no use for.
        encode_batch = getattr(enc, "encode_batch_fast", enc.encode_batch)
        for batch in _batches(units):
            encodings = encode_batch([d.text for d, _ in batch], add_special_tokens=False)
            for (doc, split), e in zip(batch, encodings, strict=True):
                writers[split].add(np.concatenate([np.asarray(e.ids, dtype=np.int32), eos_arr]))
                if on_document is not None:
                    on_document(len(doc.text.encode("utf-8")))
        train, val = writers["train"], writers["val"]
        train.finish()
        in_train = _found_in(val.sequences(), [train.folder / Path(s.file).name for s in train.shards])
        val.finish(keep=~in_train)
        for w in writers.values():
            if not w.shards:
                what = f"{w.total_tokens} tokens, fewer than one sequence of data.seq_len={seq_len}"
                if w.split == "val" and in_train.any():
                    what = f"no sequence left: all {len(in_train)} of its sequences also occur in train"
                raise DataError(
                    f"the {w.split} split has {what}",
                    hint="give more input text, or the val text with `stackwise prepare --val-input PATH`",
                )
        for split, w in writers.items():
            atomic_replace_dir(w.folder, project.path(project.split_dir(split)))
    finally:
        for w in writers.values():
            shutil.rmtree(w.folder, ignore_errors=True)  # a no-op once it has been moved into place

    for w in writers.values():
        log.info("%s: %d sequences of %d tokens in %d shards", w.split, w.next_seq_id, seq_len, len(w.shards))
    if in_train.any():
        log.info("val: %d of %d sequences dropped: they occur verbatim in train", in_train.sum(), len(in_train))
    return Packed({split: w.shards for split, w in writers.items()}, int(in_train.sum()))
