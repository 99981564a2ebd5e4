"""The validation split: which text is held out, decided before any tokenizer is trained (docs/project.md).

Three ways, all deterministic (a sha256 of the text, never a salted ``hash`` or an RNG):

- ``documents``: each whole document goes to val when the hash of its text falls below ``data.val_fraction``.
- ``chunks``: when whole documents give val fewer than ``data.min_val_sequences`` sequences (one ``input.txt``,
  or a few documents), every document is cut into chunks of about one sequence, at line ends where it can be;
  chunks go to val by the same hash rule, topped up in hash order to the minimum (val never takes more than
  ``MAX_VAL_SHARE`` of the chunks). Consecutive chunks of one document on the same side are joined again, so a
  train document is broken only where a piece of it was held out.
- ``val-input``: ``prepare --val-input`` names the val text; every main input document is train.

In every mode a val unit (document or chunk) whose whole text occurs verbatim inside the train text (a duplicate,
or a document contained in a longer one) is dropped: it is in neither split, since train already holds it.
``pack_corpus`` then drops every val sequence that occurs verbatim in the train token stream.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from stackwise_cli.data.corpus import Document

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
Method = Literal["documents", "chunks", "val-input"]
MAX_VAL_SHARE = 0.25  # data.min_val_sequences may raise val above data.val_fraction, but never past this share
# The containment check scans the train text once per val unit; past this many characters scanned it stops and
# says so (a val unit left unchecked is still covered by the packed-sequence check).
_MAX_SCAN_CHARS = 20_000_000_000
_SEP = "\x00"  # joins train texts for the containment scan; input text never holds NUL (corpus._as_text)


def unit_hash(text: str) -> float:
    """A uniform number in [0, 1): the first 8 bytes of the sha256 of the UTF-8 text."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(text: str, val_fraction: float) -> Split:
    """The split of a document (or chunk) by the hash rule: val when its hash is below ``val_fraction``."""
    return "val" if unit_hash(text) < val_fraction else "train"


@dataclass(frozen=True)
class SplitPlan:
    """What ``pack_corpus`` packs: ``units`` in input order, each with its split in ``splits``."""

    method: Method
    units: list[Document]
    splits: list[Split]
    val_units: int  # documents (documents, val-input) or chunks (chunks) held out, after dropping overlaps
    dropped_units: int  # val documents or chunks dropped because their text also occurs in train
    min_val_raised: bool = False  # chunks: val was topped up past data.val_fraction to data.min_val_sequences

    def texts(self, split: Split) -> list[str]:
        return [u.text for u, s in zip(self.units, self.splits, strict=True) if s == split]


def by_documents(docs: Sequence[Document], val_fraction: float) -> SplitPlan:
    """Whole documents by the hash rule, then val documents contained in train dropped."""
    splits: list[Split] = [split_of(d.text, val_fraction) for d in docs]
    keep = _not_in_train(list(docs), splits)
    return _plan("documents", docs, splits, keep)


def by_val_input(train_docs: Sequence[Document], val_docs: Sequence[Document]) -> SplitPlan:
    """All of ``train_docs`` is train and all of ``val_docs`` val, less the val documents contained in train."""
    units = [*train_docs, *val_docs]
    splits: list[Split] = ["train"] * len(train_docs) + ["val"] * len(val_docs)
    return _plan("val-input", units, splits, _not_in_train(units, splits))


def by_chunks(docs: Sequence[Document], val_fraction: float, chunk_chars: int, min_val_chunks: int) -> SplitPlan:
    """Documents cut into chunks of about ``chunk_chars`` characters; chunks held out by the hash rule and, when
    that gives fewer than ``min_val_chunks`` (after dropping overlaps), topped up with the next chunks in hash
    order, up to ``MAX_VAL_SHARE`` of all chunks."""
    spans = [(d, start, end) for d in docs for start, end in cut(d.text, chunk_chars)]
    chunks = [Document(f"{d.name}@{start}", d.text[start:end]) for d, start, end in spans]
    u = [unit_hash(c.text) for c in chunks]
    order = sorted(range(len(chunks)), key=lambda i: (u[i], i))  # ties (identical chunks) by input order
    cap = max(1, math.floor(MAX_VAL_SHARE * len(chunks)))
    by_fraction = sum(x < val_fraction for x in u)
    want = max(by_fraction, min(min_val_chunks, cap))
    k = want
    while True:
        chosen = set(order[:k])
        splits: list[Split] = ["val" if i in chosen else "train" for i in range(len(chunks))]
        keep = _not_in_train(chunks, splits, _train_runs(spans, splits))
        held = sum(keep[i] for i in chosen)
        if held >= want or k >= cap:
            break
        k = min(cap, k + want - held)  # replace the dropped ones with the next chunks in hash order

    # Consecutive kept chunks of one document on the same side become one unit again.
    units: list[Document] = []
    unit_splits: list[Split] = []
    last: tuple[Document, int] | None = None  # (document, end offset) of the last unit
    for (d, start, end), s, k_i in zip(spans, splits, keep, strict=True):
        if not k_i:
            last = None  # a dropped chunk leaves a gap: the next chunk starts a new unit
            continue
        if last is not None and last[0] is d and last[1] == start and unit_splits[-1] == s:
            units[-1] = Document(units[-1].name, units[-1].text + d.text[start:end])
        else:
            units.append(Document(f"{d.name}@{start}", d.text[start:end]))
            unit_splits.append(s)
        last = (d, end)
    val = sum(keep[i] for i in chosen)
    return SplitPlan("chunks", units, unit_splits, val, len(chosen) - val, min_val_raised=want > by_fraction)


def cut(text: str, chunk_chars: int) -> list[tuple[int, int]]:
    """``text`` as consecutive (start, end) spans of about ``chunk_chars`` characters, each ending at a line end
    when one falls in its second half; the spans cover the text exactly."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            nl = text.rfind("\n", start + chunk_chars // 2, end)
            if nl != -1:
                end = nl + 1
        out.append((start, end))
        start = end
    return out


def _train_runs(spans: list[tuple[Document, int, int]], splits: list[Split]) -> list[str]:
    """The train text as packing will see it: each run of consecutive train chunks of a document joined."""
    runs: list[str] = []
    prev: Document | None = None
    for (d, start, end), s in zip(spans, splits, strict=True):
        if s != "train":
            prev = None
        elif prev is d:
            runs[-1] += d.text[start:end]
        else:
            runs.append(d.text[start:end])
            prev = d
    return runs


def _not_in_train(units: list[Document], splits: list[Split], train: list[str] | None = None) -> list[bool]:
    """keep[i]: False for a val unit whose text occurs verbatim in the train text (True for every train unit).
    ``train``: the train texts, when they are not simply the train units (chunks joined again)."""
    keep = [True] * len(units)
    val = [i for i, s in enumerate(splits) if s == "val"]
    if not val:
        return keep
    if train is None:
        train = [u.text for u, s in zip(units, splits, strict=True) if s == "train"]
    train_text = _SEP.join(train)
    train_set = set(train)
    scanned, warned = 0, False
    for i in val:
        text = units[i].text
        if text in train_set:  # an exact duplicate: found in O(1) whatever the budget
            keep[i] = False
        elif scanned < _MAX_SCAN_CHARS:
            keep[i] = text not in train_text
            scanned += len(train_text)
        elif not warned:
            log.warning("val: containment in the train text checked for part of the val units only (a big corpus)")
            warned = True
    return keep


def _plan(method: Method, units: Sequence[Document], splits: list[Split], keep: list[bool]) -> SplitPlan:
    kept = [(u, s) for u, s, k in zip(units, splits, keep, strict=True) if k]
    val = sum(s == "val" for _, s in kept)
    dropped = len(units) - len(kept)
    return SplitPlan(method, [u for u, _ in kept], [s for _, s in kept], val, dropped)
