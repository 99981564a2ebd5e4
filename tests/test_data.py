"""Corpus reading (every input format and its errors), tokenizer training/loading, and packing into shards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from stackwise_cli.data.corpus import BUILTIN, Document, describe_inputs, iter_documents
from stackwise_cli.data.pack import Packed, ShardInfo, pack_corpus
from stackwise_cli.data.split import split_of
from stackwise_cli.data.tokenizer import (
    EOS,
    MASK,
    MIN_VOCAB_SIZE,
    PAD,
    eos_id,
    load_tokenizer,
    mask_id,
    pad_id,
    special_ids,
    train_tokenizer,
)
from stackwise_cli.errors import DataError
from stackwise_cli.store.files import sha256_file
from stackwise_cli.store.shards import read_token_shard


def texts(inputs, max_bytes=None) -> list[str]:
    return [d.text for d in iter_documents(inputs, max_bytes)]


# ------------------------------------------------------------------------------------------------------ input formats


def test_text_file_is_one_document(tmp_path: Path):
    f = tmp_path / "notes.md"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    assert list(iter_documents([f], None)) == [Document(str(f), "héllo\nworld\n")]


def test_folder_is_recursive_sorted_and_skips_hidden_and_binary(tmp_path: Path, caplog):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "z.txt").write_text("zed")
    (root / "a.txt").write_text("ay")
    (root / "b" / "c.py").write_text("print('c')")
    (root / ".hidden.txt").write_text("hidden file")
    (root / ".git" / "config").write_text("hidden folder")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        docs = list(iter_documents([root], None))
    assert [Path(d.name).relative_to(root).as_posix() for d in docs] == ["a.txt", "b/c.py", "z.txt"]
    assert [d.text for d in docs] == ["ay", "print('c')", "zed"]
    warned = caplog.text
    assert "image.png" in warned and "latin1.txt" in warned


def test_folder_reads_structured_files_by_extension(tmp_path: Path):
    (tmp_path / "part.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (tmp_path / "plain.txt").write_text("from txt")
    assert texts([tmp_path]) == ["from jsonl", "from txt"]


def test_jsonl_one_document_per_line(tmp_path: Path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "sécond\nline"})]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(iter_documents([f], None))
    assert [d.text for d in docs] == ["first", "sécond\nline"]
    assert [d.name for d in docs] == [f"{f}:1", f"{f}:3"]


def test_parquet_text_column(tmp_path: Path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["one", None, "three"]}), f, row_group_size=2)
    assert texts([f]) == ["one", "three"]  # a null row is skipped, not an error


@pytest.mark.parametrize("fmt", ["file", "stream"])
def test_arrow_ipc_file_and_stream(tmp_path: Path, fmt: str):
    f = tmp_path / "d.arrow"
    table = pa.table({"text": pa.array(["alpha", "beta", "gamma"], pa.large_string()), "n": [1, 2, 3]})
    new = pa.ipc.new_file if fmt == "file" else pa.ipc.new_stream
    with pa.OSFile(str(f), "wb") as sink, new(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):  # several batches: rows must continue across them
            w.write_batch(batch)
    docs = list(iter_documents([f], None))
    assert [d.text for d in docs] == ["alpha", "beta", "gamma"]
    assert docs[2].name == f"{f}#2"


def test_several_inputs_in_order(tmp_path: Path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("A")
    b.write_text("B")
    assert texts([b, a]) == ["B", "A"]


def test_max_bytes_stops_after_the_document_that_reaches_it(tmp_path: Path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["aaaa", "ééé", "cccc", "dddd"]))
    assert texts([f], max_bytes=4) == ["aaaa"]
    assert texts([f], max_bytes=5) == ["aaaa", "ééé"]  # é is 2 bytes: 4 + 6 = 10 >= 5
    assert texts([f], max_bytes=11) == ["aaaa", "ééé", "cccc"]
    assert len(texts([f], max_bytes=None)) == 4


# ------------------------------------------------------------------------------------------------------ input errors


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


BAD_INPUTS = {
    # name: (make(tmp_path) -> path, words the message must contain besides the path)
    "missing": (lambda d: d / "nope.txt", ["does not exist"]),
    "jsonl_not_json": (
        lambda d: _put(d / "x.jsonl", '{"text": "ok"}\n{"text": oops}\n'),
        ["x.jsonl:2", "not valid JSON"],
    ),
    "jsonl_no_text": (lambda d: _put(d / "x.jsonl", '{"text": "ok"}\n{"body": "b"}\n'), ["x.jsonl:2", "body"]),
    "jsonl_text_not_string": (lambda d: _put(d / "x.jsonl", '{"text": null}\n'), ["x.jsonl:1", "string"]),
    "parquet_no_text": (lambda d: _parquet(d / "x.parquet", pa.table({"body": ["b"], "id": [1]})), ["body, id"]),
    "arrow_no_text": (lambda d: _arrow(d / "x.arrow", pa.table({"content": ["b"]})), ["content"]),
    "parquet_garbage": (lambda d: _put(d / "x.parquet", "not parquet at all"), ["cannot read"]),
    "arrow_garbage": (lambda d: _put(d / "x.arrow", "not arrow at all"), ["not an Arrow IPC"]),
    "text_not_utf8": (lambda d: _put_bytes(d / "x.txt", b"caf\xe9 au lait"), ["not UTF-8"]),
    "no_text": (lambda d: _put(d / "x.jsonl", '{"text": ""}\n{"text": "  \\n"}\n'), ["no text found"]),
}


def _put(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _put_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def _arrow(path: Path, table: pa.Table) -> Path:
    _write_arrow(path, table)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_data_error_naming_the_file(tmp_path: Path, case: str):
    make, words = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as e:
        list(iter_documents([path], None))
    msg = e.value.message
    assert "\n" not in msg
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_empty_folder_has_no_text(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text found"):
        list(iter_documents([tmp_path / "empty"], None))


def test_missing_path_fails_before_any_reading(tmp_path: Path):
    good = _put(tmp_path / "good.txt", "fine")
    with pytest.raises(DataError, match="missing.txt"):
        iter_documents([good, tmp_path / "missing.txt"], None)  # no iteration needed


# ------------------------------------------------------------------------------------------------------ built-in corpus


def test_builtin_corpus_is_deterministic_capped_and_mixed():
    cap = 700_000  # past the pydoc topics (~0.5 MB), so source files must follow
    docs = list(iter_documents([], cap))
    again = [d.name for d in iter_documents([], cap)]
    assert [d.name for d in docs] == again
    names = [d.name for d in docs]
    assert any(n.startswith("pydoc:") for n in names)
    sources = [n for n in names if n.startswith("stdlib:")]
    assert len(sources) > 5
    assert all(n.endswith(".py") and "site-packages" not in n and "__pycache__" not in n for n in sources)
    assert names.index(sources[0]) > max(i for i, n in enumerate(names) if n.startswith("pydoc:"))  # docs first

    sizes = [len(d.text.encode()) for d in docs]
    assert sum(sizes) >= cap and sum(sizes[:-1]) < cap

    # Spread over the library rather than alphabetical: the first source files come from many places.
    assert sources != sorted(sources)
    assert len({n.removeprefix("stdlib:")[0] for n in sources[:10]}) >= 4


def test_describe_inputs(tmp_path: Path):
    assert describe_inputs([]) == [BUILTIN]
    f = _put(tmp_path / "a.txt", "x")
    assert describe_inputs([f]) == [str(f.resolve())]


# ------------------------------------------------------------------------------------------------------ tokenizer

CORPUS = [
    f"Document {i}: the quick brown fox {'jumps over' if i % 2 else 'naps beside'} the lazy dog number {i * 7}.\n"
    f"def f{i}(x):\n    return x * {i} + {i % 5}\n"
    for i in range(60)
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400, min_frequency=2)


def test_tokenizer_is_deterministic(tok: Tokenizer):
    assert train_tokenizer(CORPUS, vocab_size=400, min_frequency=2).to_str() == tok.to_str()


def test_tokenizer_has_eos_and_round_trips_any_text(tok: Tokenizer):
    assert eos_id(tok) == tok.token_to_id(EOS)
    assert tok.get_vocab_size() <= 400
    assert tok.get_vocab_size() > MIN_VOCAB_SIZE  # it learned merges
    text = "unseen ünïcödé 日本語 🙂\ttabs"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: nothing is unknown
    assert tok.encode(f"a{EOS}b").ids.count(eos_id(tok)) == 1


def test_mask_token_is_special_and_never_produced_by_text(tok: Tokenizer, tmp_path: Path):
    m = mask_id(tok)
    assert m not in (eos_id(tok), None)
    # Text that spells the token is encoded as ordinary bytes only if the token is not matched as special;
    # ordinary text never yields it.
    assert m not in tok.encode(" ".join(CORPUS)).ids
    assert tok.decode([m], skip_special_tokens=True) == ""

    # A tokenizer from elsewhere without [MASK] gets it appended, after every existing id.
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.add_special_tokens([EOS])
    path = tmp_path / "plain.json"
    plain.save(str(path))
    loaded = load_tokenizer(path, vocab_size=512)
    assert loaded.token_to_id(MASK) == max(plain.get_vocab(with_added_tokens=True).values()) + 1
    assert pad_id(loaded) == loaded.token_to_id(MASK) + 1  # and [PAD] after it


def test_tokenizer_has_a_pad_token_that_text_never_produces(tok: Tokenizer):
    assert [tok.token_to_id(t) for t in (EOS, MASK, PAD)] == [0, 1, 2] == special_ids(tok)
    assert pad_id(tok) == 2 and MIN_VOCAB_SIZE == 259


def test_tokenizer_vocab_size_too_small():
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_load_tokenizer(tmp_path: Path, tok: Tokenizer):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    assert load_tokenizer(path, vocab_size=512).to_str() == tok.to_str()

    n = tok.get_vocab_size()
    with pytest.raises(DataError) as e:
        load_tokenizer(path, vocab_size=300)
    assert str(path) in e.value.message and str(n) in e.value.message and "300" in e.value.message
    assert e.value.hint == f"--set model.vocab_size={n}"


def test_load_tokenizer_rejects_bad_files(tmp_path: Path):
    garbage = _put(tmp_path / "garbage.json", "{not json")
    with pytest.raises(DataError, match="garbage.json"):
        load_tokenizer(garbage, vocab_size=1000)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "absent.json", vocab_size=1000)

    no_eos = Tokenizer(models.BPE())
    no_eos.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = tmp_path / "no_eos.json"
    no_eos.save(str(path))
    with pytest.raises(DataError, match=r"no_eos.json has no <\|endoftext\|>"):
        load_tokenizer(path, vocab_size=1000)


# ------------------------------------------------------------------------------------------------------ packing


def test_split_of_is_a_stable_hash():
    # Fixed expectations: a salted hash() or another digest would move documents between splits across runs.
    splits = [split_of(t, 0.5) for t in ["hello", "world", "stackwise", "a", "b", "c"]]
    assert splits == ["val", "val", "train", "train", "val", "val"]
    share = sum(split_of(f"doc {i}", 0.2) == "val" for i in range(2000)) / 2000
    assert 0.16 < share < 0.24


def _packed(root: Path, tok: Tokenizer, docs=CORPUS, val_fraction: float = 0.3, **kw) -> Packed:
    """Pack ``docs`` split as whole documents by the hash rule."""
    args = dict(seq_len=16, sequences_per_shard=4, project_root=root) | kw
    units = ((Document(f"d{i}", t), split_of(t, val_fraction)) for i, t in enumerate(docs))
    return pack_corpus(units, tok, **args)


def _pack(root: Path, tok: Tokenizer, docs=CORPUS, **kw) -> dict[str, list[ShardInfo]]:
    return _packed(root, tok, docs, **kw).shards


def _stream(root: Path, shards: list[ShardInfo]) -> tuple[np.ndarray, np.ndarray]:
    reads = [read_token_shard(root / s.file, expect_seq_len=16) for s in shards]
    return np.concatenate([r.tokens for r in reads]), np.concatenate([r.seq_ids for r in reads])


def test_pack_sequences_shards_and_ids(tmp_path: Path, tok: Tokenizer):
    out = _pack(tmp_path, tok)
    assert set(out) == {"train", "val"}
    for split, shards in out.items():
        assert [s.file for s in shards] == [f"data/{split}/{i:05d}.arrow" for i in range(len(shards))]
        assert sorted(p.name for p in (tmp_path / "data" / split).iterdir()) == [Path(s.file).name for s in shards]
        for i, s in enumerate(shards):
            shard = read_token_shard(tmp_path / s.file)
            assert shard.tokens.shape == (s.sequences, 16)  # every sequence exactly seq_len
            assert s.tokens == s.sequences * 16
            assert s.sha256 == sha256_file(tmp_path / s.file)
            assert 1 <= s.sequences <= 4
            if i < len(shards) - 1:
                assert s.sequences == 4  # only the last shard may be short
        tokens, seq_ids = _stream(tmp_path, shards)
        assert np.array_equal(seq_ids, np.arange(len(tokens)))  # contiguous across shards, from 0
    assert not list((tmp_path / "data").glob("*.tmp-*"))  # staging folders are gone


def test_pack_stream_is_documents_joined_by_eos(tmp_path: Path, tok: Tokenizer):
    out = _pack(tmp_path, tok)
    eos = eos_id(tok)
    recovered = {}
    for split, shards in out.items():
        docs = [t for t in CORPUS if split_of(t, 0.3) == split]
        expected = np.concatenate([tok.encode(t).ids + [eos] for t in docs])
        tokens, _ = _stream(tmp_path, shards)
        flat = tokens.reshape(-1)
        # The split's stream is its documents, in input order, each followed by EOS; only the tail is cut.
        assert np.array_equal(flat, expected[: len(flat)])
        assert len(expected) - len(flat) < 16
        pieces = np.split(flat, np.flatnonzero(flat == eos) + 1)[:-1]  # complete documents only
        recovered[split] = {tok.decode(p[:-1].tolist()) for p in pieces}
        assert recovered[split] <= set(docs)
        assert all(split_of(t, 0.3) == split for t in recovered[split])
    assert recovered["train"] and recovered["val"]
    assert not recovered["train"] & recovered["val"]  # no document in both splits


def test_pack_encodes_special_token_strings_in_the_text_as_text(tmp_path: Path, tok: Tokenizer):
    # A corpus about tokenizers: it spells both special tokens. They must stay text, not become a document break
    # (EOS) or a mask-token target ([MASK]).
    letters = np.random.default_rng(0).choice(list("abcdefghij"), (40 * 12, 4))
    words = np.array(["".join(w) for w in letters]).reshape(40, 12)  # random 4-letter words
    # Distinct enough that no val sequence is also in train (those are dropped: see the overlap tests).
    docs = [
        f"Doc {i}: {' '.join(w[:6])} {EOS}{' '.join(w[6:9])} {MASK}{' '.join(w[9:])}.\n" for i, w in enumerate(words)
    ]
    out = _pack(tmp_path, tok, docs=docs, val_fraction=0.3)
    eos, m = eos_id(tok), mask_id(tok)
    for split, shards in out.items():
        flat = _stream(tmp_path, shards)[0].reshape(-1)
        assert m not in flat
        pieces = np.split(flat, np.flatnonzero(flat == eos) + 1)[:-1]
        assert pieces  # EOS only where packing put it: every complete piece is one whole document
        for p in pieces:
            text = tok.decode(p[:-1].tolist())
            assert text in docs and split_of(text, 0.3) == split
            assert tok.decode(p[:-1].tolist(), skip_special_tokens=True) == text  # ordinary ids only
    # The tokenizer itself is left as it was: a caller (or a Hugging Face export) still matches typed specials.
    assert tok.encode(f"a{EOS}").ids[-1] == eos


def test_pack_is_deterministic_and_reports_progress(tmp_path: Path, tok: Tokenizer):
    seen = []
    a = _pack(tmp_path / "a", tok, on_document=seen.append)
    b = _pack(tmp_path / "b", tok)
    assert [s.sha256 for s in a["train"] + a["val"]] == [s.sha256 for s in b["train"] + b["val"]]
    assert seen == [len(t.encode()) for t in CORPUS]


def test_pack_rerun_replaces_old_shards(tmp_path: Path, tok: Tokenizer):
    _pack(tmp_path, tok, sequences_per_shard=1)
    out = _pack(tmp_path, tok, sequences_per_shard=1000)
    assert [s.file for s in out["train"]] == ["data/train/00000.arrow"]
    assert [p.name for p in (tmp_path / "data" / "train").iterdir()] == ["00000.arrow"]  # no stale shards


def test_pack_empty_split_is_an_error_and_keeps_old_data(tmp_path: Path, tok: Tokenizer):
    old = _pack(tmp_path, tok)
    with pytest.raises(DataError) as e:
        _pack(tmp_path, tok, val_fraction=1e-9)
    assert "val split has 0 tokens" in e.value.message
    assert "--val-input" in e.value.hint
    for s in old["train"] + old["val"]:  # the previous, complete data is untouched
        assert sha256_file(tmp_path / s.file) == s.sha256
    assert not list((tmp_path / "data").glob("*.tmp-*"))

    with pytest.raises(DataError, match=r"train split has \d+ tokens, fewer than one sequence of data.seq_len=4096"):
        _pack(tmp_path / "short", tok, seq_len=4096, val_fraction=0.01)


# ------------------------------------------------------------------------------------------------------ the val split


def _prepare(tmp_path: Path, recipe_path: Path, inputs, name: str = "proj", val_inputs=None, **sets):
    from stackwise_cli.data.prepare import prepare
    from stackwise_cli.recipe import load_recipe
    from stackwise_cli.store.project import Project

    overrides = [f"{k.replace('__', '.')}={v}" for k, v in sets.items()]
    project = Project(tmp_path / name)
    m = prepare(project, load_recipe(recipe_path, overrides), inputs, val_inputs=val_inputs)
    return project, m


def _split_tokens(project, m, split: str) -> np.ndarray:
    return np.concatenate([read_token_shard(project.root / s.file).tokens for s in m.data.splits[split].shards])


def _in_train(project, m) -> list[bool]:
    """For each val sequence: does it occur verbatim (as consecutive tokens) anywhere in the train stream?"""
    train = _split_tokens(project, m, "train").astype(np.int32).tobytes()
    return [row.astype(np.int32).tobytes() in train for row in _split_tokens(project, m, "val")]


@pytest.fixture(scope="module")
def prose() -> str:
    """About 80 KB of varied English and code: the head of the built-in corpus."""
    return "\n".join(texts([], 80_000))


def test_one_input_file_gives_a_held_out_val_split(tmp_path: Path, tiny_recipe_path: Path, prose: str):
    # One input.txt, the most common thing a new user has: whole-document assignment cannot split it.
    f = _put(tmp_path / "input.txt", prose)
    project, m = _prepare(tmp_path, tiny_recipe_path, [f], data__val_fraction=0.02, data__min_val_sequences=40)
    h = m.data.holdout
    assert h.method == "chunks" and h.val_units > 1 and h.min_val_raised  # 2% of the chunks is under 40
    assert 40 <= m.data.splits["val"].sequences <= 0.25 * (m.data.splits["train"].sequences + 40)
    assert not any(_in_train(project, m))
    # Deterministic: the same input gives the same shards, byte for byte.
    again_project, again = _prepare(
        tmp_path, tiny_recipe_path, [f], "again", data__val_fraction=0.02, data__min_val_sequences=40
    )
    shas = lambda mm: [s.sha256 for sp in mm.data.splits.values() for s in sp.shards]  # noqa: E731
    assert shas(again) == shas(m)


def test_twenty_documents_at_a_small_val_fraction(tmp_path: Path, tiny_recipe_path: Path, prose: str):
    # Twenty documents none of which the hash puts in val at 0.05 (the seed project refused this corpus).
    folder = tmp_path / "docs"
    folder.mkdir()
    step = len(prose) // 20
    for i in range(20):
        text = _val_by_hash(prose[i * step : (i + 1) * step] + "\n# part ", "train", 0.05)
        _put(folder / f"{i:02d}.txt", text)
    project, m = _prepare(tmp_path, tiny_recipe_path, [folder], data__val_fraction=0.05)
    assert m.data.holdout.method == "chunks"
    assert m.data.splits["val"].sequences >= m.recipe.data.min_val_sequences
    assert not any(_in_train(project, m))
    # Enough whole documents: they are kept whole.
    many = folder.parent / "many"
    many.mkdir()
    for i, t in enumerate(texts([], 300_000)):
        _put(many / f"{i:04d}.txt", t)
    _, m2 = _prepare(tmp_path, tiny_recipe_path, [many], "many", data__val_fraction=0.1, data__min_val_sequences=8)
    assert m2.data.holdout.method == "documents" and m2.data.holdout.val_units >= 1


def _val_by_hash(prefix: str, want: str, fraction: float) -> str:
    """The first text ``prefix + str(i)`` that the hash rule puts in ``want``."""
    return next(prefix + str(i) for i in range(10_000) if split_of(prefix + str(i), fraction) == want)


def test_a_document_contained_in_a_train_document_is_dropped_from_val():
    from stackwise_cli.data.split import by_chunks, by_documents

    inner = _val_by_hash("A short note that is quoted elsewhere, number ", "val", 0.3)
    outer = _val_by_hash(f"Preface.\n{inner}\nAfterword ", "train", 0.3)
    dup = _val_by_hash("An exact duplicate ", "val", 0.3)
    others = [f"document {i} about something else entirely" for i in range(30)]
    docs = [Document(f"d{i}", t) for i, t in enumerate([inner, outer, dup, dup, *others])]
    plan = by_documents(docs, 0.3)
    val = plan.texts("val")
    assert inner not in val and outer in plan.texts("train")
    assert plan.dropped_units == 1  # the contained one
    assert val.count(dup) == 2  # an exact duplicate hashes alike: both copies on one side, never split across
    assert plan.val_units == 2 + sum(split_of(t, 0.3) == "val" for t in others)
    # The same rule for chunks: no val chunk is text that train also holds.
    chunked = by_chunks(docs, 0.3, chunk_chars=20, min_val_chunks=5)
    train_text = "\x00".join(chunked.texts("train"))
    assert all(t not in train_text for t in chunked.texts("val"))


def test_val_sequences_found_in_train_are_dropped(tmp_path: Path, tok: Tokenizer):
    # A val document that is a long passage of a train document under another heading (as pydoc's "class" topic
    # is a section of "compound"): not contained as a whole, yet most of its packed sequences occur in train.
    passage = " ".join(f"w{i * 37 % 101}" for i in range(300))
    val_doc = _val_by_hash(f"{passage}\nSee also: ", "val", 0.5)
    train_doc = _val_by_hash(f"Compound statements\n{passage}\nMore ", "train", 0.5)
    fresh = _val_by_hash("Unrelated val text: " + " ".join(f"q{i}" for i in range(120)) + " ", "val", 0.5)
    packed = _packed(tmp_path, tok, docs=[train_doc, val_doc, fresh], val_fraction=0.5, sequences_per_shard=3)
    assert packed.val_overlap_sequences > 0
    flat_train = _stream(tmp_path, packed.shards["train"])[0].reshape(-1).astype(np.int32).tobytes()
    val, ids = _stream(tmp_path, packed.shards["val"])
    assert len(val) >= 1 and np.array_equal(ids, np.arange(len(val)))
    assert not any(row.astype(np.int32).tobytes() in flat_train for row in val)
    total = (len(tok.encode(val_doc).ids) + len(tok.encode(fresh).ids) + 2) // 16
    assert len(val) + packed.val_overlap_sequences == total  # only the overlapping ones went


def test_val_input_is_val_and_all_of_the_input_is_train(tmp_path: Path, tiny_recipe_path: Path, prose: str):
    from typer.testing import CliRunner

    from stackwise_cli.app import app

    train_f = _put(tmp_path / "train.txt", prose[: len(prose) // 2])
    val_f = _put(tmp_path / "val.txt", prose[len(prose) // 2 :])
    root = tmp_path / "proj"
    args = ["prepare", "--recipe", str(tiny_recipe_path), "-p", str(root), "--input", str(train_f)]
    result = CliRunner().invoke(app, [*args, "--val-input", str(val_f), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["val"]["method"] == "val-input" and data["val"]["val_input"] == [str(val_f.resolve())]
    assert data["val"]["units"] == 1 and not data["val"]["documents_split"]
    from stackwise_cli.store.project import Project

    project = Project(root)
    m = project.load()
    assert m.data.documents == {"train": 1, "val": 1}
    assert "--val-input" in m.history[-1].command
    tok_ = Tokenizer.from_file(str(root / "tokenizer.json"))
    want = len(tok_.encode(val_f.read_text()).ids) + 1  # the whole val file (and its EOS), less the tail
    assert (want // 32) - data["val"]["dropped_sequences"] == data["splits"]["val"]["sequences"]
    assert data["splits"]["train"]["tokens"] == (len(tok_.encode(train_f.read_text()).ids) + 1) // 32 * 32

    human = CliRunner().invoke(
        app, [*args[:3], "-p", str(tmp_path / "p2"), "--input", str(train_f), "--val-input", str(val_f)]
    )
    assert human.exit_code == 0, human.output
    assert "val from --val-input: 1 documents" in human.stdout
