"""``prepare``: a new project from a recipe — tokenizer, packed train/val shards, and the manifest.

The manifest is written last: until it exists the folder is not a project, and rerunning ``prepare`` starts
over cleanly, so a kill at any point loses nothing.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from stackwise_cli.data.corpus import Document, ReadStats, describe_inputs, iter_documents
from stackwise_cli.data.pack import pack_corpus
from stackwise_cli.data.split import MAX_VAL_SHARE, SplitPlan, by_chunks, by_documents, by_val_input, unit_hash
from stackwise_cli.data.tokenizer import (
    EOS,
    MASK,
    eos_id,
    eos_token_of,
    load_tokenizer,
    pad_id,
    special_ids,
    text_encoder,
    train_tokenizer,
)
from stackwise_cli.errors import ProjectError
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import DataRecipe, Recipe
from stackwise_cli.store.files import atomic_write_text, sha256_file
from stackwise_cli.store.manifest import (
    DataEntry,
    HoldoutEntry,
    Manifest,
    ShardEntry,
    SplitEntry,
    TokenizerEntry,
)
from stackwise_cli.store.project import Project, now, record

log = logging.getLogger(__name__)
_SAMPLE_CHARS = 1_000_000  # text tokenized to measure characters per token, to size the chunks


def prepare(
    project: Project,
    recipe: Recipe,
    inputs: list[Path] | None = None,
    tokenizer: Path | None = None,
    reporter: Reporter = QUIET,
    val_inputs: list[Path] | None = None,
) -> Manifest:
    """Create ``project``: the tokenizer, the train/val token shards (docs/project.md says how val is chosen) and
    the manifest. ``val_inputs``: take val from these inputs, and all of ``inputs`` as train."""
    if project.exists():
        raise ProjectError(
            f"{project.manifest_path} already exists: this folder is a prepared project",
            hint="use another -p folder, or `stackwise build` to continue this one",
        )
    inputs = list(inputs or [])
    shutil.rmtree(project.root / "data", ignore_errors=True)  # leftovers of a killed prepare
    data = recipe.data
    warnings: list[str] = []  # said once each as they happen, and kept in the manifest (data.warnings)
    docs = _read(inputs, data, reporter, "corpus", warnings)
    val_docs = _read(val_inputs, data, reporter, "val input", warnings) if val_inputs else None
    given = load_tokenizer(tokenizer, recipe.model.vocab_size, recipe.objective) if tokenizer is not None else None
    eos_token = eos_token_of(tokenizer, given) if given is not None else EOS  # a Hugging Face tokenizer's own

    def fit(plan: SplitPlan) -> Tokenizer:
        if given is not None:
            return given
        with reporter.task(f"train tokenizer ({recipe.model.vocab_size} tokens)"):
            # Trained on the training text only: nothing of the validation text leaks into the model.
            return train_tokenizer(plan.texts("train"), recipe.model.vocab_size, data.min_frequency)

    if val_docs is not None:
        plan = by_val_input(docs, val_docs)
        tok = fit(plan)
    else:
        plan, tok = _split(docs, data, fit, given, recipe.model.vocab_size)
    reporter.info(_describe(plan, data, val_inputs))
    _warn(reporter, warnings, _small_vocab(tok, recipe.model.vocab_size, given is None))
    project.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(project.path(project.tokenizer_file), tok.to_str())

    n_bytes = sum(len(u.text.encode()) for u in plan.units)
    with reporter.task("tokenize and pack", total=n_bytes) as advance:
        packed = pack_corpus(
            zip(plan.units, plan.splits, strict=True),
            tok,
            seq_len=data.seq_len,
            sequences_per_shard=data.sequences_per_shard,
            project_root=project.root,
            on_document=advance,
            eos=eos_id(tok, eos_token),
        )
    splits = packed.shards
    n_val = sum(s.sequences for s in splits["val"])
    if packed.val_overlap_sequences:
        reporter.info(f"val: {packed.val_overlap_sequences} sequences dropped: they occur verbatim in train")
    if n_val < data.min_val_sequences:
        reporter.info(
            f"warning: val has {n_val} sequences, fewer than data.min_val_sequences={data.min_val_sequences}: "
            "give more input text, or the val text with --val-input"
        )
    entries = {
        name: SplitEntry(
            sequences=sum(s.sequences for s in shards),
            tokens=sum(s.tokens for s in shards),
            shards=[ShardEntry(file=s.file, sequences=s.sequences, tokens=s.tokens, sha256=s.sha256) for s in shards],
        )
        for name, shards in splits.items()
    }
    documents = {name: plan.splits.count(name) for name in ("train", "val")}
    holdout = HoldoutEntry(
        method=plan.method,
        val_units=plan.val_units,
        dropped_units=plan.dropped_units,
        dropped_sequences=packed.val_overlap_sequences,
        min_val_raised=plan.min_val_raised,
        source=describe_inputs(val_inputs) if val_inputs else [],
    )
    manifest = Manifest(
        created=now(),
        recipe=recipe,
        tokenizer=TokenizerEntry(
            file=project.tokenizer_file,
            sha256=sha256_file(project.path(project.tokenizer_file)),
            vocab_size=tok.get_vocab_size(),
            eos_id=eos_id(tok, eos_token),
            eos_token=eos_token,
            mask_id=tok.token_to_id(MASK),
            pad_id=pad_id(tok),
            special_ids=special_ids(tok),
            trained=given is None,
        ),
        data=DataEntry(
            source=describe_inputs(inputs),
            seq_len=data.seq_len,
            documents=documents,
            splits=entries,
            holdout=holdout,
            warnings=warnings,
        ),
    )
    command = f"prepare --recipe {recipe.name}" + (f" --tokenizer {tokenizer}" if tokenizer else "")
    command += "".join(f" --val-input {p}" for p in val_inputs or [])
    record(manifest, command)
    with project.lock():
        project.save(manifest)
    return manifest


def _read(
    inputs: Sequence[Path], data: DataRecipe, reporter: Reporter, what: str, warnings: list[str]
) -> list[Document]:
    stats = ReadStats()
    with reporter.task(f"read {what}") as advance:
        docs = []
        for d in iter_documents(inputs, data.max_bytes, data.text_field, stats):
            docs.append(d)
            advance(1)
    # The built-in corpus is meant to be sampled at data.max_bytes (its files are in hash order): said, not warned.
    sampled = f" (its first data.max_bytes={data.max_bytes:,})" if stats.truncated and not inputs else ""
    reporter.info(
        f"{what}: {stats.documents} documents, {stats.bytes / 1e6:.1f} MB from {', '.join(describe_inputs(inputs))}"
        + sampled
    )
    for note in stats.notes:
        reporter.info(f"{what}: {note}")
    if stats.truncated and inputs:
        _warn(
            reporter,
            warnings,
            f"{what} cut at data.max_bytes={data.max_bytes:,}: {stats.documents:,} documents read, the rest of the "
            "input is unused (--set data.max_bytes=null reads all of it)",
        )
    return docs


def _warn(reporter: Reporter, warnings: list[str], message: str | None) -> None:
    if message:
        warnings.append(message)
        reporter.info(f"warning: {message}")


def _small_vocab(tok: Tokenizer, vocab_size: int, trained: bool) -> str | None:
    """A tokenizer with fewer tokens than model.vocab_size leaves embedding and head rows no token ever uses."""
    n = tok.get_vocab_size()
    if n >= vocab_size:
        return None
    how = "the tokenizer trained on this text has" if trained else "the given tokenizer has"
    return (
        f"{how} {n:,} tokens, fewer than model.vocab_size={vocab_size:,}: {vocab_size - n:,} embedding rows will "
        f"never be used (--set model.vocab_size={n} fits it{', or give more text' if trained else ''})"
    )


def _split(
    docs: list[Document],
    data: DataRecipe,
    fit: Callable[[SplitPlan], Tokenizer],
    given: Tokenizer | None,
    vocab_size: int,
) -> tuple[SplitPlan, Tokenizer]:
    """(plan, tokenizer): whole documents when they give val ``data.min_val_sequences`` sequences, else chunks.

    The tokenizer is trained on the train text of the plan that is kept (twice when documents are cut: the
    first, trained on the whole-document train split, is what counts that split's val sequences)."""
    plan = by_documents(docs, data.val_fraction)
    chars = [len(u.text) for u in plan.units]
    val_chars = sum(c for c, s in zip(chars, plan.splits, strict=True) if s == "val")
    # One input.txt (or a few big documents) whose hash falls in val would leave train with (almost) nothing.
    lopsided = val_chars > max(MAX_VAL_SHARE, 2 * data.val_fraction) * max(1, sum(chars))
    if not lopsided:
        tok = fit(plan)
        enc = text_encoder(tok)
        val_tokens = sum(len(e.ids) + 1 for e in enc.encode_batch(plan.texts("val"), add_special_tokens=False))
        if val_tokens // data.seq_len >= data.min_val_sequences:
            return plan, tok
    chunk_chars = max(1, round(data.seq_len * _chars_per_token(docs, given, vocab_size, data.min_frequency)))
    # A margin over the minimum: a val chunk packs to about one sequence, and some may prove to overlap train.
    plan = by_chunks(docs, data.val_fraction, chunk_chars, math.ceil(data.min_val_sequences * 1.15) + 1)
    return plan, fit(plan)


def _chars_per_token(docs: list[Document], given: Tokenizer | None, vocab_size: int, min_frequency: int) -> float:
    """Characters per token on a sample of the corpus (documents in hash order, so it is spread over the whole
    input), with the given tokenizer or one trained on the sample alone and thrown away."""
    sample, n = [], 0
    for d in sorted(docs, key=lambda d: unit_hash(d.text)):
        sample.append(d.text[: _SAMPLE_CHARS - n])
        n += len(sample[-1])
        if n >= _SAMPLE_CHARS:
            break
    tok = given if given is not None else train_tokenizer(sample, vocab_size, min_frequency)
    n_tokens = sum(len(e.ids) for e in text_encoder(tok).encode_batch(sample, add_special_tokens=False))
    return n / max(1, n_tokens)


def _describe(plan: SplitPlan, data: DataRecipe, val_inputs: list[Path] | None) -> str:
    dropped = f"; {plan.dropped_units} dropped: their text also occurs in train" if plan.dropped_units else ""
    if plan.method == "val-input":
        return f"val: {plan.val_units} documents from --val-input {', '.join(map(str, val_inputs or []))}{dropped}"
    if plan.method == "documents":
        return f"val: {plan.val_units} whole documents by hash (data.val_fraction={data.val_fraction}){dropped}"
    raised = f", raised to data.min_val_sequences={data.min_val_sequences}" if plan.min_val_raised else ""
    return (
        f"val: {plan.val_units} chunks of about {data.seq_len} tokens (data.val_fraction={data.val_fraction}"
        f"{raised}): whole documents gave too little val text, so documents were split{dropped}"
    )
