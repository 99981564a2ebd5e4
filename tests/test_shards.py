"""Arrow token and hidden-state shards: exact roundtrips, zero-copy reads, and clean errors on bad files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from stackwise_cli.errors import CorruptFileError, DataError
from stackwise_cli.store.files import sha256_file
from stackwise_cli.store.shards import (
    read_hidden_shard,
    read_token_shard,
    write_hidden_shard,
    write_token_shard,
)


def _tokens(n: int = 7, t: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, size=(n, t), dtype=np.int32)


def _hidden(n: int = 5, t: int = 8, d: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, t, d, generator=g) * 10
    # Values that a lossy or value-converting path would change: specials, signed zero, tiny and huge numbers.
    h[0, 0, :6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, 3e38])
    return h


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which this process has ``path`` memory-mapped (Linux /proc)."""
    target = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _inside_mapping(address: int, nbytes: int, path: Path) -> bool:
    return any(lo <= address and address + nbytes <= hi for lo, hi in _mapped_ranges(path))


# ------------------------------------------------------------------------------------------------------ roundtrips


def test_token_shard_roundtrip(tmp_path: Path):
    path = tmp_path / "data" / "train" / "00000.arrow"
    tokens = _tokens()
    digest = write_token_shard(path, tokens, first_seq_id=100)
    assert digest == sha256_file(path)
    assert [p.name for p in path.parent.iterdir()] == ["00000.arrow"]  # no temporary left behind

    shard = read_token_shard(path, expect_seq_len=16)
    assert shard.tokens.dtype == np.int32 and shard.tokens.shape == (7, 16)
    assert np.array_equal(shard.tokens, tokens)
    assert np.array_equal(shard.seq_ids, np.arange(100, 107))
    assert len(shard) == 7 and shard.seq_len == 16

    schema = pa.ipc.open_file(pa.memory_map(str(path))).schema
    assert schema.metadata == {b"kind": b"tokens", b"seq_len": b"16"}
    assert schema.field("tokens").type == pa.list_(pa.int32(), 16)
    assert schema.field("seq_id").type == pa.int64()


def test_empty_token_shard_roundtrip(tmp_path: Path):
    path = tmp_path / "empty.arrow"
    write_token_shard(path, np.zeros((0, 4), dtype=np.int32), first_seq_id=0)
    shard = read_token_shard(path)
    assert shard.tokens.shape == (0, 4) and len(shard) == 0


def test_hidden_bf16_roundtrip_is_bit_exact(tmp_path: Path):
    path = tmp_path / "h.arrow"
    h = _hidden()
    seq_ids = np.array([3, 1, 4, 1, 5])
    digest = write_hidden_shard(path, h, seq_ids, "bf16")
    assert digest == sha256_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the read-only numpy warning must not leak out
        shard = read_hidden_shard(path, expect_shape=(8, 12))
    assert shard.hidden.dtype == torch.bfloat16 and shard.hidden.shape == (5, 8, 12)
    assert shard.dtype == "bf16"
    expected_bits = h.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(shard.hidden.view(torch.int16), expected_bits)  # bits, so NaN and -0.0 count too
    assert np.array_equal(shard.seq_ids, seq_ids)

    field = pa.ipc.open_file(pa.memory_map(str(path))).schema.field("hidden")
    assert field.type == pa.list_(pa.uint16(), 8 * 12)
    assert field.metadata == {b"dtype": b"bf16", b"shape": b"[8, 12]"}


def test_hidden_fp32_roundtrip_is_exact(tmp_path: Path):
    path = tmp_path / "h.arrow"
    h = _hidden()
    write_hidden_shard(path, h, np.arange(5), "fp32")
    shard = read_hidden_shard(path)
    assert shard.hidden.dtype == torch.float32 and shard.dtype == "fp32"
    assert torch.equal(shard.hidden.view(torch.int32), h.view(torch.int32))


def test_hidden_fp8_roundtrip_within_the_e4m3_bound_per_token(tmp_path: Path):
    torch.manual_seed(0)
    h = torch.randn(6, 8, 64) * torch.logspace(-3, 3, 8)[None, :, None]  # tokens of very different scales
    h[2, 3] = 0.0  # an all-zero token
    path = tmp_path / "h.arrow"
    write_hidden_shard(path, h, np.arange(6), "fp8")
    shard = read_hidden_shard(path, expect_shape=(8, 64))
    back = shard.hidden[:]
    assert back.dtype == torch.float32 and back.shape == h.shape
    amax = h.abs().amax(-1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: the error is at most half an ulp of the token's largest value, 2^-4 * amax,
    # relative to each token's own amax however small it is (per-token scales).
    assert bool(((back - h).abs() <= amax * 2**-4 + 1e-30).all())
    assert torch.equal(back[2, 3], torch.zeros(64))
    assert torch.equal(shard.hidden[4], back[4])  # one row, dequantised on its own, is the same
    assert shard.dtype == "fp8"
    # 1 byte per value plus 4 per token (1.004 at D = 1024), against 2 for bf16.
    wide = torch.randn(6, 8, 1024)
    write_hidden_shard(tmp_path / "w8.arrow", wide, np.arange(6), "fp8")
    write_hidden_shard(tmp_path / "w16.arrow", wide, np.arange(6), "bf16")
    assert 0.49 < os.path.getsize(tmp_path / "w8.arrow") / os.path.getsize(tmp_path / "w16.arrow") < 0.52


def test_hidden_writer_accepts_bf16_input_and_rejects_bad_shapes(tmp_path: Path):
    h = _hidden().to(torch.bfloat16)
    write_hidden_shard(tmp_path / "h.arrow", h, np.arange(5), "bf16")
    assert torch.equal(read_hidden_shard(tmp_path / "h.arrow").hidden.view(torch.int16), h.view(torch.int16))
    with pytest.raises(ValueError, match="seq_ids"):
        write_hidden_shard(tmp_path / "x.arrow", h, np.arange(4), "bf16")
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        write_hidden_shard(tmp_path / "x.arrow", h[0], np.arange(8), "bf16")


# ------------------------------------------------------------------------------------------------------ zero copy


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see memory mappings")
def test_readers_return_views_of_the_mapped_file(tmp_path: Path):
    tpath = tmp_path / "t.arrow"
    write_token_shard(tpath, _tokens(n=64, t=32), first_seq_id=0)
    shard = read_token_shard(tpath)
    for arr in (shard.tokens, shard.seq_ids):
        assert not arr.flags.owndata and not arr.flags.writeable
        assert _inside_mapping(arr.__array_interface__["data"][0], arr.nbytes, tpath)

    for dtype in ("bf16", "fp32"):
        hpath = tmp_path / f"h-{dtype}.arrow"
        write_hidden_shard(hpath, _hidden(n=16, t=8, d=32), np.arange(16), dtype)
        hidden = read_hidden_shard(hpath).hidden
        nbytes = hidden.numel() * hidden.element_size()
        assert _inside_mapping(hidden.data_ptr(), nbytes, hpath)


def test_mapping_outlives_the_reader(tmp_path: Path):
    # Nothing but the returned arrays keeps the file mapped; they must stay valid after the reader returns.
    path = tmp_path / "h.arrow"
    h = _hidden()
    write_hidden_shard(path, h, np.arange(5), "fp32")
    hidden = read_hidden_shard(path).hidden
    import gc

    gc.collect()
    assert torch.equal(hidden.view(torch.int32), h.view(torch.int32))


# ------------------------------------------------------------------------------------------------------ bad files


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _emptied(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(3000))


def _deleted(path: Path) -> None:
    path.unlink()


def _no_footer(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-10])


@pytest.mark.parametrize("damage", [_truncated, _emptied, _garbage, _deleted, _no_footer])
@pytest.mark.parametrize("kind", ["tokens", "hidden"])
def test_damaged_shard_is_a_one_line_corrupt_file_error(tmp_path: Path, damage, kind: str):
    path = tmp_path / "s.arrow"
    if kind == "tokens":
        write_token_shard(path, _tokens(n=50), first_seq_id=0)
        read = read_token_shard
    else:
        write_hidden_shard(path, _hidden(), np.arange(5), "bf16")
        read = read_hidden_shard
    damage(path)
    with pytest.raises(CorruptFileError) as e:
        read(path)
    assert str(path) in e.value.message and "\n" not in e.value.message
    assert "stackwise verify" in e.value.hint


def test_wrong_kind_is_corrupt(tmp_path: Path):
    tpath, hpath, other = tmp_path / "t.arrow", tmp_path / "h.arrow", tmp_path / "other.arrow"
    write_token_shard(tpath, _tokens(), first_seq_id=0)
    write_hidden_shard(hpath, _hidden(), np.arange(5), "fp32")
    table = pa.table({"seq_id": pa.array([0], pa.int64())})
    with pa.OSFile(str(other), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(CorruptFileError, match="is not a hidden shard"):
        read_hidden_shard(tpath)
    with pytest.raises(CorruptFileError, match="is not a tokens shard"):
        read_token_shard(hpath)
    with pytest.raises(CorruptFileError, match="kind=missing"):
        read_token_shard(other)


def test_shape_mismatch_is_a_data_error(tmp_path: Path):
    tpath, hpath = tmp_path / "t.arrow", tmp_path / "h.arrow"
    write_token_shard(tpath, _tokens(t=16), first_seq_id=0)
    write_hidden_shard(hpath, _hidden(t=8, d=12), np.arange(5), "bf16")
    with pytest.raises(DataError, match="16 tokens but 32 were expected") as e:
        read_token_shard(tpath, expect_seq_len=32)
    assert str(tpath) in e.value.message
    with pytest.raises(DataError, match=r"\[8, 12\] but \[8, 16\]") as e:
        read_hidden_shard(hpath, expect_shape=(8, 16))
    assert str(hpath) in e.value.message and "stackwise cache" in e.value.hint
