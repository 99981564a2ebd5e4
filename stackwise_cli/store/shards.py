"""Arrow IPC shards: packed token sequences (``data/<split>/``) and cached hidden states (``cache/<id>/<split>/``).

One row per sequence, one record batch per file. Readers memory-map the file and hand out numpy arrays / torch
tensors that are views over the mapping: opening a shard costs no copy and no memory beyond the pages touched,
which is what lets a training loop sample from a cache larger than RAM.

Layouts (``T`` = sequence length, ``D`` = hidden size):

- tokens: ``seq_id: int64``, ``tokens: fixed_size_list<int32>[T]``; schema metadata ``kind=tokens, seq_len=T``.
- hidden: ``seq_id: int64``, ``hidden: fixed_size_list<uint16 | float32 | uint8>[T*D]``; schema metadata
  ``kind=hidden``; the ``hidden`` field's metadata ``dtype=bf16|fp32|fp8, shape=[T, D]``. bf16 is stored as its raw
  bits in uint16 because Arrow has no bfloat16 type; the bits round-trip exactly. fp8 is e4m3 (raw bits in uint8)
  with one fp32 scale per token in a ``scale: fixed_size_list<float32>[T]`` column: value = code * scale, with
  scale = amax over the token's D values / 448, so each token uses the whole e4m3 range (1 + 4/D bytes a value).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import numpy as np
import pyarrow as pa

from stackwise_cli.errors import CorruptFileError, DataError
from stackwise_cli.store.files import atomic_write

if TYPE_CHECKING:
    import torch

HiddenDtype = Literal["bf16", "fp32", "fp8"]

_VERIFY_HINT = "run `stackwise verify`"
# Storage type of each cache dtype: types of the same width, so torch can view the mapped bytes directly.
_STORAGE = {"bf16": pa.uint16(), "fp32": pa.float32(), "fp8": pa.uint8()}


@dataclass(frozen=True)
class TokenShard:
    seq_ids: np.ndarray  # (N,) int64, read-only view of the file
    tokens: np.ndarray  # (N, T) int32, read-only view of the file

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


class Fp8Hidden:
    """An fp8 cache's (N, T, D) states as codes and per-token scales, views of the file; indexing dequantises
    just the rows asked for, to float32."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales  # (N, T, D) float8_e4m3fn, (N, T) float32
        self.shape = codes.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> torch.Tensor:
        import torch

        from stackwise_cli.store.e4m3 import fp8_dequantize_reference

        return fp8_dequantize_reference(self.codes[rows], self.scales[rows], torch.float32)


@dataclass(frozen=True)
class HiddenShard:
    seq_ids: np.ndarray  # (N,) int64, read-only view of the file
    hidden: torch.Tensor | Fp8Hidden  # (N, T, D) bfloat16 or float32 (a view of the file: never write to it), or fp8

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def dtype(self) -> HiddenDtype:
        import torch

        if isinstance(self.hidden, Fp8Hidden):
            return "fp8"
        return "bf16" if self.hidden.dtype == torch.bfloat16 else "fp32"


# ------------------------------------------------------------------------------------------------------------ writing


class _HashingSink:
    """A write-only file object that hashes what passes through. The Arrow IPC file writer only appends (the
    footer goes last, nothing is patched), so the hash of the stream is the hash of the file, and the shard is
    never read back just to checksum it."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._pos = 0
        self.sha256 = hashlib.sha256()
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self._f.write(view)
        self._pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        # atomic_write owns the real file: it still has to fsync and rename it.
        self.closed = True


def _write_batch(path: Path, batch: pa.RecordBatch) -> str:
    digest = ""

    def write(f: BinaryIO) -> None:
        nonlocal digest
        sink = _HashingSink(f)
        with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), batch.schema) as writer:
            writer.write_batch(batch)
        digest = sink.sha256.hexdigest()

    atomic_write(path, write)
    return digest


def write_token_shard(path: Path, tokens: np.ndarray, first_seq_id: int) -> str:
    """Write ``tokens`` (N, T) as a token shard whose rows have ids ``first_seq_id ... first_seq_id + N - 1``.

    Returns the sha256 of the file as written.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (N, T), got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
        raise ValueError(f"token ids must fit in int32, got range [{tokens.min()}, {tokens.max()}]")
    n, t = tokens.shape
    values = pa.array(np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1))
    schema = pa.schema(
        [pa.field("seq_id", pa.int64()), pa.field("tokens", pa.list_(pa.int32(), t))],
        metadata={"kind": "tokens", "seq_len": str(t)},
    )
    seq_ids = pa.array(np.arange(first_seq_id, first_seq_id + n, dtype=np.int64))
    batch = pa.record_batch([seq_ids, pa.FixedSizeListArray.from_arrays(values, t)], schema=schema)
    return _write_batch(Path(path), batch)


def write_hidden_shard(path: Path, hidden: torch.Tensor, seq_ids: np.ndarray, dtype: HiddenDtype) -> str:
    """Write hidden states ``hidden`` (N, T, D) for the sequences ``seq_ids`` (N,), stored as ``dtype``.

    Returns the sha256 of the file as written.
    """
    import torch

    if dtype not in _STORAGE:
        raise ValueError(f"dtype must be one of {sorted(_STORAGE)}, got {dtype!r}")
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be (N, T, D), got shape {tuple(hidden.shape)}")
    n, t, d = hidden.shape
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    if seq_ids.shape != (n,):
        raise ValueError(f"seq_ids must be ({n},) to match hidden, got shape {seq_ids.shape}")

    h = hidden.detach()
    columns = []
    if dtype == "bf16":
        # The raw bits, reinterpreted (not converted): int16 because torch's uint16 has no numpy bridge on every
        # version; numpy then relabels the same bytes as uint16.
        flat = h.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    elif dtype == "fp8":
        from stackwise_cli.store.e4m3 import fp8_quantize_reference

        codes, scales = fp8_quantize_reference(h.to(device="cpu", dtype=torch.float32))  # (N, T, D), (N, T)
        flat = codes.contiguous().view(torch.uint8).numpy()
        scale_values = pa.array(scales.contiguous().numpy().reshape(-1))
        columns.append(
            (pa.field("scale", pa.list_(pa.float32(), t)), pa.FixedSizeListArray.from_arrays(scale_values, t))
        )
    else:
        flat = h.to(device="cpu", dtype=torch.float32).contiguous().numpy()
    values = pa.array(flat.reshape(-1))
    field = pa.field("hidden", pa.list_(_STORAGE[dtype], t * d), metadata={"dtype": dtype, "shape": json.dumps([t, d])})
    fields = [pa.field("seq_id", pa.int64()), field] + [f for f, _ in columns]
    arrays = [pa.array(seq_ids), pa.FixedSizeListArray.from_arrays(values, t * d)] + [a for _, a in columns]
    batch = pa.record_batch(arrays, schema=pa.schema(fields, metadata={"kind": "hidden"}))
    return _write_batch(Path(path), batch)


# ------------------------------------------------------------------------------------------------------------ reading


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path} {what}", hint=_VERIFY_HINT)


def _open(path: Path, kind: str) -> tuple[pa.Schema, pa.Table | pa.RecordBatch]:
    """Map ``path``, check it is a complete Arrow IPC file of ``kind``, and return its schema and its rows."""
    try:
        # Not closed here on purpose: the arrays handed out keep the mapping alive, and it is unmapped when the
        # last of them is freed.
        source = pa.memory_map(str(path))
    except FileNotFoundError:
        raise _corrupt(path, "is missing") from None
    except (pa.ArrowException, OSError) as e:
        raise _corrupt(path, f"cannot be read ({_one_line(e)})") from e
    try:
        reader = pa.ipc.open_file(source)
        schema = reader.schema
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        for b in batches:
            # Cheap structural check (buffer sizes against lengths): a footer that points past the data is
            # caught here rather than as a crash on first access.
            b.validate()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _corrupt(path, f"is truncated or not an Arrow file ({_one_line(e)})") from e

    found = (schema.metadata or {}).get(b"kind", b"").decode(errors="replace")
    if found != kind:
        raise _corrupt(path, f"is not a {kind} shard (kind={found or 'missing'})")
    # Our writers emit exactly one batch, which maps to one contiguous buffer per column; anything else is
    # still readable, at the price of a copy to make it contiguous.
    rows = batches[0] if len(batches) == 1 else pa.Table.from_batches(batches, schema=schema).combine_chunks()
    return schema, rows


def _values(path: Path, rows: pa.Table | pa.RecordBatch, name: str) -> np.ndarray:
    """The flat values of a column as a read-only numpy view of the mapped file (a copy only for multi-chunk)."""
    col = rows.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    if col.null_count:
        raise _corrupt(path, f"has {col.null_count} null values in column '{name}'")
    if pa.types.is_fixed_size_list(col.type):
        col = col.flatten()
    return col.to_numpy(zero_copy_only=True)


def _check_column(path: Path, schema: pa.Schema, name: str, expected: pa.DataType) -> None:
    if schema.get_field_index(name) < 0:
        raise _corrupt(path, f"has no '{name}' column (columns found: {', '.join(schema.names)})")
    if schema.field(name).type != expected:
        raise _corrupt(path, f"column '{name}' is {schema.field(name).type}, expected {expected}")


def read_token_shard(path: Path, *, expect_seq_len: int | None = None) -> TokenShard:
    """Memory-map a token shard. ``expect_seq_len``: raise DataError if its sequences have another length."""
    path = Path(path)
    schema, rows = _open(path, "tokens")
    try:
        seq_len = int((schema.metadata or {}).get(b"seq_len", b""))
    except ValueError:
        raise _corrupt(path, "has no valid seq_len in its metadata") from None
    _check_column(path, schema, "seq_id", pa.int64())
    _check_column(path, schema, "tokens", pa.list_(pa.int32(), seq_len))
    if expect_seq_len is not None and seq_len != expect_seq_len:
        raise DataError(
            f"{path} holds sequences of {seq_len} tokens but {expect_seq_len} were expected (data.seq_len)",
            hint="rerun `stackwise prepare` with the recipe this project was made with",
        )
    seq_ids = _values(path, rows, "seq_id")
    tokens = _values(path, rows, "tokens").reshape(len(seq_ids), seq_len)  # (N, T), still a view
    return TokenShard(seq_ids=seq_ids, tokens=tokens)


def read_hidden_shard(path: Path, *, expect_shape: tuple[int, int] | None = None) -> HiddenShard:
    """Memory-map a hidden-state shard. ``expect_shape``: (T, D) it must hold, else DataError."""
    import torch

    path = Path(path)
    schema, rows = _open(path, "hidden")
    _check_column(path, schema, "seq_id", pa.int64())
    if schema.get_field_index("hidden") < 0:
        raise _corrupt(path, f"has no 'hidden' column (columns found: {', '.join(schema.names)})")
    meta = schema.field("hidden").metadata or {}
    dtype = meta.get(b"dtype", b"").decode(errors="replace")
    if dtype not in _STORAGE:
        raise _corrupt(path, f"has an unknown hidden dtype {dtype or 'missing'!r}")
    try:
        t, d = (int(x) for x in json.loads(meta.get(b"shape", b"")))
    except (ValueError, TypeError):
        raise _corrupt(path, f"has no valid hidden shape in its metadata (found {meta.get(b'shape')!r})") from None
    _check_column(path, schema, "hidden", pa.list_(_STORAGE[dtype], t * d))
    if expect_shape is not None and (t, d) != tuple(expect_shape):
        raise DataError(
            f"{path} holds hidden states of shape [T, D] = [{t}, {d}] but [{expect_shape[0]}, {expect_shape[1]}] "
            "were expected (a cache made for another sequence length or model width)",
            hint="rebuild it with `stackwise cache`",
        )

    seq_ids = _values(path, rows, "seq_id")
    flat = _values(path, rows, "hidden")
    if dtype == "bf16":
        flat = flat.view(np.int16)  # same bits; torch reinterprets them as bfloat16 below
    if dtype == "fp8":
        _check_column(path, schema, "scale", pa.list_(pa.float32(), t))
    with warnings.catch_warnings():
        # The view is read-only because the file is mapped read-only; torch warns that it cannot express that.
        # Nothing in stackwise writes to a cache tensor, so the warning would only be noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        hidden = torch.from_numpy(flat)
        scales = torch.from_numpy(_values(path, rows, "scale")) if dtype == "fp8" else None
    if dtype == "bf16":
        hidden = hidden.view(torch.bfloat16)
    if dtype == "fp8":
        codes = hidden.view(torch.float8_e4m3fn).view(len(seq_ids), t, d)
        return HiddenShard(seq_ids=seq_ids, hidden=Fp8Hidden(codes, scales.view(len(seq_ids), t)))
    return HiddenShard(seq_ids=seq_ids, hidden=hidden.view(len(seq_ids), t, d))  # (N, T, D)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
