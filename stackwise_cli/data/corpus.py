"""Where text comes from: files, folders, JSONL, CSV/TSV, Parquet and Arrow inputs (text formats also gzip- or
zstd-compressed), a Hugging Face ``datasets`` folder written by ``save_to_disk``, or the built-in corpus.

Everything is read lazily, one document at a time, so a corpus larger than memory streams through
tokenizer training and packing.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from stackwise_cli.errors import DataError

log = logging.getLogger(__name__)

BUILTIN = "builtin:python-stdlib"

_JSONL = {".jsonl", ".ndjson"}
_CSV = {".csv": ",", ".tsv": "\t"}
_PARQUET = {".parquet"}
# Feather v2 *is* the Arrow IPC file format, so it costs nothing to accept the name too.
_ARROW = {".arrow", ".feather"}
_COMPRESSED = {".gz", ".zst"}
DEFAULT_TEXT_FIELD = "text"
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_HINT_INPUTS = "pass `stackwise prepare` files that contain text, or no inputs for the built-in corpus"


@dataclass(frozen=True)
class Document:
    name: str  # where it came from: a path, path:line, path#row, or stdlib:/pydoc: for the built-in corpus
    text: str


@dataclass
class ReadStats:
    """What ``iter_documents`` read: filled in as it goes, final once iteration ends."""

    documents: int = 0
    bytes: int = 0
    truncated: bool = False  # stopped at max_bytes with more text left unread
    notes: list[str] = field(default_factory=list)  # one line each, e.g. which split of a DatasetDict was read


def iter_documents(
    inputs: Sequence[Path],
    max_bytes: int | None,
    text_field: str = DEFAULT_TEXT_FIELD,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Documents from ``inputs`` in a deterministic order; no inputs means the built-in corpus.

    Stops after the document whose UTF-8 size brings the running total to ``max_bytes`` or more (None: no cap);
    ``stats`` (if given) then says whether any text was left unread. ``text_field`` is the JSONL field or the
    Parquet / Arrow / CSV column that holds the text. Missing paths are reported here, before anything is read,
    so a typo fails in a second rather than after minutes of reading; problems inside files are reported when
    iteration reaches them.
    """
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError(f"input {p} does not exist", hint=_HINT_INPUTS)
    stats = stats if stats is not None else ReadStats()
    if paths:
        where = ", ".join(str(p) for p in paths)
        return _capped(_path_documents(paths, text_field, stats), max_bytes, where, stats)
    return _capped(_builtin_documents(), max_bytes, f"the built-in corpus ({BUILTIN})", stats)


def describe_inputs(inputs: Sequence[Path]) -> list[str]:
    """What the manifest records as the data source: ``[BUILTIN]`` or the resolved input paths."""
    if not inputs:
        return [BUILTIN]
    return [str(Path(p).resolve()) for p in inputs]


def _capped(docs: Iterable[Document], max_bytes: int | None, where: str, stats: ReadStats) -> Iterator[Document]:
    found_text = False
    docs = iter(docs)
    for doc in docs:
        if not doc.text:
            continue  # an empty document would only add a lone EOS token
        found_text = found_text or not doc.text.isspace()
        stats.documents += 1
        stats.bytes += len(doc.text.encode("utf-8"))
        yield doc
        if max_bytes is not None and stats.bytes >= max_bytes:
            # One look ahead says whether the cap cut anything off (the next document is read, not kept).
            stats.truncated = any(d.text for d in docs)
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


def _path_documents(paths: Sequence[Path], field: str, stats: ReadStats) -> Iterator[Document]:
    for p in paths:
        if p.is_dir():
            yield from _folder_documents(p, field, stats)
        else:
            yield from _file_documents(p, in_folder=False, field=field)


def _is_hf_dataset(folder: Path) -> bool:
    """A Hugging Face ``datasets`` folder written by ``save_to_disk``: one Dataset, or a DatasetDict of them."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _folder_documents(folder: Path, field: str, stats: ReadStats) -> Iterator[Document]:
    if _is_hf_dataset(folder):
        yield from _hf_dataset_documents(folder, field, stats)
        return
    entries = []
    for dirpath, dirs, names in os.walk(folder):
        here = Path(dirpath)
        if here != folder and _is_hf_dataset(here):
            entries.append(here)  # read as a dataset (its arrow files), not as a folder of loose files
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place: hidden folders are not entered
        entries.extend(Path(dirpath, n) for n in names if not n.startswith("."))
    # Sorted by path components, like `find | sort`, so the corpus order never depends on the filesystem.
    for path in sorted(entries, key=lambda p: p.relative_to(folder).parts):
        if path.is_dir():
            yield from _hf_dataset_documents(path, field, stats)
        else:
            yield from _file_documents(path, in_folder=True, field=field)


def _hf_dataset_documents(folder: Path, field: str, stats: ReadStats) -> Iterator[Document]:
    """The rows of a ``save_to_disk`` folder, read from its Arrow stream files in the order state.json lists.

    A DatasetDict contributes its ``train`` split only (the one it has, if it has one split): stackwise makes its
    own val split, and reading a test split into training would leak it. Pass ``folder/<split>`` to read another.
    """
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{folder}/dataset_dict.json is not a datasets DatasetDict index ({e})") from None
        chosen = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if chosen is None:
            raise DataError(
                f"{folder} is a DatasetDict with splits {', '.join(splits)} and no train split",
                hint=f"pass one split's folder, e.g. --input {folder / splits[0]}",
            )
        if len(splits) > 1:
            others = ", ".join(s for s in splits if s != chosen)
            stats.notes.append(f"{folder}: read its {chosen} split only (not {others})")
        yield from _hf_dataset_documents(folder / chosen, field, stats)
        return
    try:
        files = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}/state.json is not a datasets save_to_disk state ({e})") from None
    for name in files:
        yield from _arrow_documents(folder / name, field)


def _open_binary(path: Path) -> io.BufferedIOBase:
    """``path`` opened for reading bytes, decompressing .gz (gzip) and .zst (Zstandard) on the fly."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".gz":
            return gzip.open(path, "rb")
        if suffix == ".zst":
            try:
                import zstandard
            except ImportError:
                raise DataError(
                    f"{path} is Zstandard-compressed and the zstandard package is not installed",
                    hint="pip install 'stackwise[inputs]' (or zstandard), or decompress it with `zstd -d`",
                ) from None
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e


def _read_all(path: Path) -> bytes:
    with _open_binary(path) as f:
        try:
            return f.read()
        except (OSError, EOFError, ValueError) as e:  # gzip: BadGzipFile is an OSError; zstd: ZstdError
            raise DataError(f"cannot read {path}: {_one_line(e)}") from e
        except Exception as e:  # zstandard.ZstdError derives from Exception only
            if type(e).__name__ == "ZstdError":
                raise DataError(f"cannot read {path}: {_one_line(e)}") from e
            raise


def _file_documents(path: Path, in_folder: bool, field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    suffix = path.suffix.lower()
    # The format is the suffix under the compression one: notes.txt.gz is text, data.jsonl.zst is JSONL.
    inner = Path(path.stem).suffix.lower() if suffix in _COMPRESSED else suffix
    if inner in _JSONL:
        yield from _jsonl_documents(path, field)
    elif inner in _CSV:
        yield from _csv_documents(path, field, _CSV[inner])
    elif inner in _PARQUET:
        yield from _parquet_documents(path, field)
    elif inner in _ARROW:
        yield from _arrow_documents(path, field)
    else:
        text = _as_text(_read_all(path))
        if text is None:
            # Inside a folder a stray binary (an image, a .DS_Store-like file) is not worth stopping for;
            # a file named explicitly is, since the user clearly meant it to be text.
            if in_folder:
                log.warning("skipping %s: not UTF-8 text", path)
                return
            raise DataError(
                f"{path} is not UTF-8 text",
                hint="convert it to UTF-8; text, .jsonl, .csv/.tsv (each also .gz/.zst), .parquet and .arrow are read",
            )
        yield Document(str(path), text)


def _as_text(data: bytes) -> str | None:
    """UTF-8 text without a byte-order mark, or None for binary data (undecodable, or containing NUL bytes)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _text_stream(path: Path, newline: str | None = None) -> io.TextIOWrapper:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", newline=newline)


def _jsonl_documents(path: Path, field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    with _text_stream(path) as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text") from e
            except (OSError, EOFError) as e:
                raise DataError(f"cannot read {path}: {_one_line(e)}") from e
            if not line:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or field not in record:
                found = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f'{path}:{lineno}: expected a JSON object with a "{field}" field, found {found}',
                    hint=_FIELD_HINT,
                )
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f'{path}:{lineno}: "{field}" must be a string, found {type(text).__name__}')
            yield Document(f"{path}:{lineno}", text)


_FIELD_HINT = "name the text field with --text-field NAME (or --set data.text_field=NAME)"


def _csv_documents(path: Path, field: str, delimiter: str) -> Iterator[Document]:
    # A document may span many lines and megabytes inside one quoted cell: lift the csv module's 128 kB cap.
    csv.field_size_limit(2**31 - 1)
    with _text_stream(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None or field not in header:
                found = ", ".join(header or []) or "none"
                raise DataError(f"{path} has no {field!r} column (columns found: {found})", hint=_FIELD_HINT)
            col = header.index(field)
            for row, record in enumerate(reader):
                if col < len(record) and record[col]:
                    yield Document(f"{path}#{row}", record[col])
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{reader.line_num}: not UTF-8 text") from e
        except (OSError, EOFError) as e:
            raise DataError(f"cannot read {path}: {_one_line(e)}") from e


def _text_column(path: Path, schema: pa.Schema, field: str) -> None:
    if field not in schema.names:
        raise DataError(
            f"{path} has no {field!r} column (columns found: {', '.join(schema.names) or 'none'})", hint=_FIELD_HINT
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, expected strings", hint=_FIELD_HINT)


def _rows(path: Path, batches: Iterator[pa.RecordBatch], field: str) -> Iterator[Document]:
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read {path} (row {row}): {_one_line(e)}") from e
        if batch is None:
            return
        for text in batch.column(field).to_pylist():
            if text is not None:  # a null row is a missing document, not an error
                yield Document(f"{path}#{row}", text)
            row += 1


def _arrow_source(path: Path):
    """Random-access bytes of ``path``: memory-mapped, or (compressed) decompressed into memory."""
    if path.suffix.lower() in _COMPRESSED:
        return pa.BufferReader(_read_all(path))
    return pa.memory_map(str(path))


def _parquet_documents(path: Path, field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(_arrow_source(path))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path} as Parquet: {_one_line(e)}") from e
    _text_column(path, pf.schema_arrow, field)
    yield from _rows(path, pf.iter_batches(batch_size=1024, columns=[field]), field)


def _arrow_documents(path: Path, field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    try:
        source = _arrow_source(path)
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
        _text_column(path, schema, field)
        yield from _rows(path, batches, field)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
