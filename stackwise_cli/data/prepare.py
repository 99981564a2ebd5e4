"""``prepare``: a new project from a recipe — tokenizer, packed train/val shards, and the manifest.

The manifest is written last: until it exists the folder is not a project, and rerunning ``prepare`` starts
over cleanly, so a kill at any point loses nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stackwise_cli.data.corpus import describe_inputs, iter_documents
from stackwise_cli.data.pack import pack_corpus, split_of
from stackwise_cli.data.tokenizer import eos_id, load_tokenizer, mask_id, train_tokenizer
from stackwise_cli.errors import ProjectError
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import Recipe
from stackwise_cli.store.files import atomic_write_text, sha256_file
from stackwise_cli.store.manifest import DataEntry, Manifest, ShardEntry, SplitEntry, TokenizerEntry
from stackwise_cli.store.project import Project, now, record


def prepare(
    project: Project,
    recipe: Recipe,
    inputs: list[Path] | None = None,
    tokenizer: Path | None = None,
    reporter: Reporter = QUIET,
) -> Manifest:
    if project.exists():
        raise ProjectError(
            f"{project.manifest_path} already exists: this folder is a prepared project",
            hint="use another -p folder, or `stackwise build` to continue this one",
        )
    inputs = list(inputs or [])
    shutil.rmtree(project.root / "data", ignore_errors=True)  # leftovers of a killed prepare
    data = recipe.data
    with reporter.task("read corpus") as advance:
        docs = []
        for d in iter_documents(inputs, data.max_bytes):
            docs.append(d)
            advance(1)
    n_bytes = sum(len(d.text.encode()) for d in docs)
    reporter.info(f"corpus: {len(docs)} documents, {n_bytes / 1e6:.1f} MB from {', '.join(describe_inputs(inputs))}")
    split = [split_of(d.text, data.val_fraction) for d in docs]  # each document's split, hashed once

    if tokenizer is None:
        with reporter.task(f"train tokenizer ({recipe.model.vocab_size} tokens)"):
            # Trained on the training documents only: nothing of the validation text leaks into the model.
            train_docs = (d.text for d, sp in zip(docs, split) if sp == "train")
            tok = train_tokenizer(train_docs, recipe.model.vocab_size, data.min_frequency)
    else:
        tok = load_tokenizer(tokenizer, recipe.model.vocab_size)
    project.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(project.root / "tokenizer.json", tok.to_str())

    with reporter.task("tokenize and pack", total=n_bytes) as advance:
        splits = pack_corpus(
            docs,
            tok,
            seq_len=data.seq_len,
            val_fraction=data.val_fraction,
            sequences_per_shard=data.sequences_per_shard,
            project_root=project.root,
            on_document=advance,
        )
    entries = {
        name: SplitEntry(
            sequences=sum(s.sequences for s in shards),
            tokens=sum(s.tokens for s in shards),
            shards=[ShardEntry(file=s.file, sequences=s.sequences, tokens=s.tokens, sha256=s.sha256) for s in shards],
        )
        for name, shards in splits.items()
    }
    documents = {name: split.count(name) for name in ("train", "val")}
    manifest = Manifest(
        created=now(),
        recipe=recipe,
        tokenizer=TokenizerEntry(
            file="tokenizer.json",
            sha256=sha256_file(project.root / "tokenizer.json"),
            vocab_size=tok.get_vocab_size(),
            eos_id=eos_id(tok),
            mask_id=mask_id(tok),
            trained=tokenizer is None,
        ),
        data=DataEntry(source=describe_inputs(inputs), seq_len=data.seq_len, documents=documents, splits=entries),
    )
    record(manifest, f"prepare --recipe {recipe.name}" + (f" --tokenizer {tokenizer}" if tokenizer else ""))
    with project.lock():
        project.save(manifest)
    return manifest
