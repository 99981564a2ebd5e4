"""Where text comes from: files, folders, JSONL, Parquet and Arrow inputs, or the built-in corpus.

Everything is read lazily, one document at a time, so a corpus larger than memory streams through
tokenizer training and packing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from stackwise_cli.errors import DataError

log = logging.getLogger(__name__)

BUILTIN = "builtin:python-stdlib"

_JSONL = {".jsonl"}
_PARQUET = {".parquet"}
# Feather v2 *is* the Arrow IPC file format, so it costs nothing to accept the name too.
_ARROW = {".arrow", ".feather"}
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_HINT_INPUTS = "pass `stackwise prepare` files that contain text, or no inputs for the built-in corpus"


@dataclass(frozen=True)
class Document:
    name: str  # where it came from: a path, path:line, path#row, or stdlib:/pydoc: for the built-in corpus
    text: str


def iter_documents(inputs: Sequence[Path], max_bytes: int | None) -> Iterator[Document]:
    """Documents from ``inputs`` in a deterministic order; no inputs means the built-in corpus.

    Stops after the document whose UTF-8 size brings the running total to ``max_bytes`` or more (None: no cap).
    Missing paths are reported here, before anything is read, so a typo fails in a second rather than after
    minutes of reading; problems inside files are reported when iteration reaches them.
    """
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError(f"input {p} does not exist", hint=_HINT_INPUTS)
    if paths:
        where = ", ".join(str(p) for p in paths)
        return _capped(_path_documents(paths), max_bytes, where)
    return _capped(_builtin_documents(), max_bytes, f"the built-in corpus ({BUILTIN})")


def describe_inputs(inputs: Sequence[Path]) -> list[str]:
    """What the manifest records as the data source: ``[BUILTIN]`` or the resolved input paths."""
    if not inputs:
        return [BUILTIN]
    return [str(Path(p).resolve()) for p in inputs]


def _capped(docs: Iterable[Document], max_bytes: int | None, where: str) -> Iterator[Document]:
    total_bytes = 0
    found_text = False
    for doc in docs:
        if not doc.text:
            continue  # an empty document would only add a lone EOS token
        found_text = found_text or not doc.text.isspace()
        yield doc
        if max_bytes is not None:
            total_bytes += len(doc.text.encode("utf-8"))
            if total_bytes >= max_bytes:
                break
    if not found_text:
        raise DataError(f"no text found in {where}", hint=_HINT_INPUTS)


# ---------------------------------------------------------------------------------------------- the built-in corpus


def _builtin_documents() -> Iterator[Document]:
    """The running interpreter's standard library: its documentation, then its source files.

    Always present, needs no network, and mixes English prose with code. Source files are ordered by a hash of
    their relative path, so the order is the same on every machine yet a ``max_bytes`` cap samples the whole
    library instead of only the modules whose names start with "a".
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split the docs into a separate package
        log.warning("pydoc_data is not installed; the built-in corpus has source files only")
        topics = {}
    for topic in sorted(topics):
        yield Document(f"pydoc:{topic}", topics[topic])

    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in _stdlib_sources(root):
        try:
            text = _as_text((root / rel).read_bytes())
        except OSError:
            text = None
        # A few test modules are deliberately mis-encoded; they are skipped silently as they are expected.
        if text is not None:
            yield Document(f"stdlib:{rel}", text)


def _stdlib_sources(root: Path) -> list[str]:
    rels = []
    for folder, dirs, files in os.walk(root):
        # Pruning in place stops os.walk from descending into installed packages and bytecode caches.
        dirs[:] = [d for d in dirs if d not in _SKIP_STDLIB_DIRS and not d.startswith(".")]
        for name in files:
            if name.endswith(".py") and not name.startswith("."):
                rels.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(rels, key=lambda r: (hashlib.sha256(r.encode()).hexdigest(), r))


# ---------------------------------------------------------------------------------------------- files and folders


def _path_documents(paths: Sequence[Path]) -> Iterator[Document]:
    for p in paths:
        if p.is_dir():
            yield from _folder_documents(p)
        else:
            yield from _file_documents(p, in_folder=False)


def _folder_documents(folder: Path) -> Iterator[Document]:
    files = []
    for dirpath, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place: hidden folders are not entered
        files.extend(Path(dirpath, n) for n in names if not n.startswith("."))
    # Sorted by path components, like `find | sort`, so the corpus order never depends on the filesystem.
    for path in sorted(files, key=lambda p: p.relative_to(folder).parts):
        yield from _file_documents(path, in_folder=True)


def _file_documents(path: Path, in_folder: bool) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in _JSONL:
        yield from _jsonl_documents(path)
    elif suffix in _PARQUET:
        yield from _parquet_documents(path)
    elif suffix in _ARROW:
        yield from _arrow_documents(path)
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from e
        text = _as_text(data)
        if text is None:
            # Inside a folder a stray binary (an image, a .DS_Store-like file) is not worth stopping for;
            # a file named explicitly is, since the user clearly meant it to be text.
            if in_folder:
                log.warning("skipping %s: not UTF-8 text", path)
                return
            raise DataError(f"{path} is not UTF-8 text", hint="convert it to UTF-8, or pass it as .jsonl/.parquet")
        yield Document(str(path), text)


def _as_text(data: bytes) -> str | None:
    """UTF-8 text without a byte-order mark, or None for binary data (undecodable, or containing NUL bytes)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _jsonl_documents(path: Path) -> Iterator[Document]:
    try:
        f = open(path, encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    with f:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text") from e
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror}") from e
            if not line:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or "text" not in record:
                found = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
                raise DataError(f'{path}:{lineno}: expected a JSON object with a "text" field, found {found}')
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f'{path}:{lineno}: "text" must be a string, found {type(text).__name__}')
            yield Document(f"{path}:{lineno}", text)


def _text_column(path: Path, schema: pa.Schema) -> None:
    if "text" not in schema.names:
        raise DataError(f"{path} has no 'text' column (columns found: {', '.join(schema.names) or 'none'})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column 'text' holds {kind}, expected strings")


def _rows(path: Path, batches: Iterator[pa.RecordBatch]) -> Iterator[Document]:
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read {path} (row {row}): {_one_line(e)}") from e
        if batch is None:
            return
        for text in batch.column("text").to_pylist():
            if text is not None:  # a null row is a missing document, not an error
                yield Document(f"{path}#{row}", text)
            row += 1


def _parquet_documents(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} as Parquet: {_one_line(e)}") from e
    _text_column(path, pf.schema_arrow)
    yield from _rows(path, pf.iter_batches(batch_size=1024, columns=["text"]))


def _arrow_documents(path: Path) -> Iterator[Document]:
    try:
        source = pa.memory_map(str(path))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path}: {_one_line(e)}") from e
    with source:
        # Both Arrow IPC layouts are in use: the random-access file format (what `pyarrow.feather` and most
        # tools write) and the stream format (what Hugging Face `datasets` caches are).
        try:
            reader = pa.ipc.open_file(source)
            batches: Iterator[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
        except (pa.ArrowException, OSError):
            try:
                source.seek(0)
                stream = pa.ipc.open_stream(source)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path} is not an Arrow IPC file or stream: {_one_line(e)}") from e
            batches, schema = iter(stream), stream.schema
        _text_column(path, schema)
        yield from _rows(path, batches)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
