"""Packing: documents -> tokens -> fixed-length sequences -> train/val token shards.

Each document is tokenized, followed by EOS, and appended to its split's token stream; the stream is cut into
sequences of exactly ``seq_len`` tokens (so a sequence may span documents, as in GPT-2 style pretraining) and
the sequences are written in shards. The split is decided per document, by a hash of its text, so a document
is never in both splits and re-running on the same input gives the same split on any machine.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from stackwise_cli.data.corpus import Document
from stackwise_cli.data.tokenizer import eos_id, text_encoder
from stackwise_cli.errors import DataError
from stackwise_cli.store.files import atomic_replace_dir, tmp_name
from stackwise_cli.store.shards import write_token_shard

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
# Documents tokenized per encode_batch call: large enough for the tokenizer's thread pool to pay off, small enough
# that the batch's tokens stay a small fraction of a shard.
_BATCH_DOCS = 256
_BATCH_BYTES = 4 << 20


def split_of(text: str, val_fraction: float) -> Split:
    """The split a document belongs to: a stable function of its text (sha256, not Python's salted ``hash``)."""
    return _split_of_bytes(text.encode("utf-8"), val_fraction)


def _split_of_bytes(data: bytes, val_fraction: float) -> Split:
    # The first 8 bytes of the digest as a uniform number in [0, 1).
    u = int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the project root, e.g. "data/train/00000.arrow"
    sequences: int
    tokens: int
    sha256: str


class _SplitWriter:
    """Accumulates one split's token stream and writes a shard each time a full one is available."""

    def __init__(self, split: Split, folder: Path, rel_folder: str, seq_len: int, sequences_per_shard: int):
        self.split = split
        self.folder = folder  # where shards are written now (a staging folder)
        self.rel_folder = rel_folder  # where they will live, relative to the project root
        self.seq_len = seq_len
        self.shard_tokens = seq_len * sequences_per_shard
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.total_tokens = 0  # all tokens of the split, including the dropped tail
        self.next_seq_id = 0
        self.shards: list[ShardInfo] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.total_tokens += len(ids)
        if self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            n_full = len(stream) // self.shard_tokens
            for i in range(n_full):
                self._write(stream[i * self.shard_tokens : (i + 1) * self.shard_tokens])
            rest = stream[n_full * self.shard_tokens :]
            self.pending = [rest]
            self.pending_tokens = len(rest)

    def finish(self) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=np.int32)
        n_seq = len(stream) // self.seq_len
        if n_seq:
            # The tail shorter than seq_len is dropped: every sequence has exactly seq_len tokens.
            self._write(stream[: n_seq * self.seq_len])
        self.pending, self.pending_tokens = [], 0

    def _write(self, stream: np.ndarray) -> None:
        seqs = stream.reshape(-1, self.seq_len)  # (N, T)
        name = f"{len(self.shards):05d}.arrow"
        digest = write_token_shard(self.folder / name, seqs, first_seq_id=self.next_seq_id)
        self.shards.append(ShardInfo(f"{self.rel_folder}/{name}", len(seqs), seqs.size, digest))
        self.next_seq_id += len(seqs)
        log.debug("wrote %s/%s: %d sequences", self.rel_folder, name, len(seqs))


def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def pack_corpus(
    docs: Iterable[Document],
    tok: Tokenizer,
    *,
    seq_len: int,
    val_fraction: float,
    sequences_per_shard: int,
    project_root: Path,
    on_document: Callable[[int], None] | None = None,
) -> dict[str, list[ShardInfo]]:
    """Tokenize ``docs`` and write ``data/train/*.arrow`` and ``data/val/*.arrow`` under ``project_root``.

    Streams: at most one shard of tokens per split plus one batch of documents is held in memory. Sequence ids
    run 0, 1, 2, ... through each split's shards. ``on_document(n_bytes)`` is called after each document with its
    UTF-8 size, for a progress bar.

    Shards are written into staging folders that replace ``data/<split>/`` only once both splits are complete,
    so a failure or a kill leaves the previous data untouched (and no stale shards of an earlier, longer run).
    """
    project_root = Path(project_root)
    eos = eos_id(tok)
    data_dir = project_root / "data"
    writers: dict[str, _SplitWriter] = {}
    for split in SPLITS:
        staging = tmp_name(data_dir / split)
        staging.mkdir(parents=True)
        writers[split] = _SplitWriter(split, staging, f"data/{split}", seq_len, sequences_per_shard)
    try:
        eos_arr = np.array([eos], dtype=np.int32)
        # Special tokens spelled out in the text stay text: a corpus that mentions <|endoftext|> gets no spurious
        # document break, one that mentions [MASK] no mask-token targets.
        enc = text_encoder(tok)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets that packing has no use for.
        encode_batch = getattr(enc, "encode_batch_fast", enc.encode_batch)
        for batch in _batches(docs):
            encodings = encode_batch([d.text for d in batch], add_special_tokens=False)
            for doc, enc in zip(batch, encodings, strict=True):
                data = doc.text.encode("utf-8")
                ids = np.concatenate([np.asarray(enc.ids, dtype=np.int32), eos_arr])
                writers[_split_of_bytes(data, val_fraction)].add(ids)
                if on_document is not None:
                    on_document(len(data))
        for w in writers.values():
            w.finish()
        for w in writers.values():
            if not w.shards:
                raise DataError(
                    f"the {w.split} split has {w.total_tokens} tokens, fewer than one sequence of "
                    f"data.seq_len={seq_len}",
                    hint=f"give more input text or change data.val_fraction (now {val_fraction})",
                )
        for split, w in writers.items():
            atomic_replace_dir(w.folder, data_dir / split)
    finally:
        for w in writers.values():
            shutil.rmtree(w.folder, ignore_errors=True)  # a no-op once it has been moved into place

    for w in writers.values():
        dropped = w.total_tokens - sum(s.tokens for s in w.shards)
        log.info(
            "%s: %d sequences of %d tokens in %d shards (%d tail tokens dropped)",
            w.split,
            w.next_seq_id,
            seq_len,
            len(w.shards),
            dropped,
        )
    return {split: w.shards for split, w in writers.items()}
