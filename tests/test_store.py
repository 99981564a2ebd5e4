"""The artifact store: atomic files, the manifest lock, strict schema, checksums, stale caches."""

from __future__ import annotations

import pytest
import yaml

from stackwise_cli.errors import CorruptFileError, ManifestError, StaleError
from stackwise_cli.store.files import atomic_write, atomic_write_bytes, sha256_file, sweep_tmp


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old complete version")

    def half_then_crash(f):
        f.write(b"new but half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old complete version"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_temporaries_of_dead_writers_only(tmp_path):
    import os

    dead = _dead_pid()
    (tmp_path / f"a.safetensors.tmp-{dead}-abcd").write_bytes(b"x")
    (tmp_path / f"b.safetensors.tmp-{os.getpid()}-abcd").write_bytes(b"in progress")  # a live writer
    (tmp_path / "keep.safetensors").write_bytes(b"y")
    assert sweep_tmp(tmp_path, min_age_s=0) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"b.safetensors.tmp-{os.getpid()}-abcd", "keep.safetensors"]
    (tmp_path / f"c.tmp-{dead}-abcd").write_bytes(b"recent")
    assert sweep_tmp(tmp_path) == 0  # too recent: maybe a writer on another node


def test_sweep_restores_a_folder_whose_replacement_never_arrived(tmp_path):
    """atomic_replace_dir moves the old folder aside first; if killed there, the old folder comes back."""
    dead = _dead_pid()
    old = tmp_path / f"fused.tmp-old-{dead}-abcd"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old model")
    (tmp_path / f"fused.tmp-{dead}-ef01").mkdir()  # the half-written new one
    sweep_tmp(tmp_path, min_age_s=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == b"old model"


def test_manifest_roundtrips_and_is_human_readable(project):
    m = project.load()
    text = project.manifest_path.read_text()
    data = yaml.safe_load(text)
    assert data["format"] == 1 and data["recipe"]["model"]["d_model"] == 32
    assert data["data"]["splits"]["train"]["shards"][0]["sha256"] == sha256_file(
        project.root / "data/train/00000.arrow"
    )
    project.save(m)
    assert project.load() == m


def test_manifest_schema_reports_every_problem_with_its_key_path(project):
    data = yaml.safe_load(project.manifest_path.read_text())
    data["recipe"]["train"]["stepz"] = 3
    data["data"]["seq_len"] = "long"
    data["colour"] = "red"
    project.manifest_path.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as e:
        project.load()
    msg = str(e.value)
    for key in ("recipe.train.stepz: unknown key", "data.seq_len: must be an integer", "colour: unknown key"):
        assert key in msg
    assert msg.count("stackwise.yaml") == 3  # every line names the file


def test_manifest_that_is_not_yaml_is_a_clear_error(project):
    project.manifest_path.write_text("rack: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        project.load()


def test_stack_file_checksum_mismatch_is_detected(project):
    from stackwise_cli.model.io import load_stack
    from stackwise_cli.train.grow import grow

    grow(project)
    m = project.load()
    path = project.path(m.rack[0].file)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_stack(project, m, 0)


def test_cache_goes_stale_when_a_producer_changes(project):
    from stackwise_cli.train.cache import build_cache
    from stackwise_cli.train.grow import grow
    from stackwise_cli.train.stack import train_stack

    grow(project)
    grow(project)
    train_stack(project, 0, steps=3)
    entry = build_cache(project, 1, "train")
    assert entry.complete and project.fresh_cache(project.load(), 1, "train") == entry
    train_stack(project, 0, steps=3, resume="never")  # stack 0 and the embedding change
    m = project.load()
    reasons = project.stale_reasons(m, m.cache(1, "train"))
    assert any("stack(s) 0 changed" in r for r in reasons) and any("embedding" in r for r in reasons)
    with pytest.raises(StaleError, match="stackwise cache 1"):
        project.fresh_cache(m, 1, "train")


def _pretend_trained(project, *ids):
    """Mark stacks trained without training them: these tests are about the cache's bookkeeping and arithmetic."""
    with project.update() as m:
        for i in ids:
            m.stack(i).state = "trained"


def test_cache_is_restartable_and_keeps_finished_shards(project, monkeypatch):
    """A cache killed after its first shard resumes with that shard kept and gives the same result."""
    import stackwise_cli.train.cache as cache_mod
    from stackwise_cli.train.grow import grow

    grow(project)
    grow(project)
    _pretend_trained(project, 0)
    shards = project.load().data.splits["train"].shards
    assert len(shards) >= 2, "the fixture must have several train shards for this test"
    real = cache_mod.write_hidden_shard
    calls = []

    def dies_on_second(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while writing shard 1
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "write_hidden_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.build_cache(project, 1, "train")
    partial = project.load().cache(1, "train")
    assert not partial.complete and len(partial.shards) == 1
    first = project.path(partial.shards[0].file).stat().st_mtime_ns

    monkeypatch.setattr(cache_mod, "write_hidden_shard", real)
    done = cache_mod.build_cache(project, 1, "train")
    assert done.complete and len(done.shards) == len(shards)
    assert project.path(done.shards[0].file).stat().st_mtime_ns == first  # kept, not recomputed
    assert [s.sequences for s in done.shards] == [s.sequences for s in shards]


def test_incremental_cache_equals_full_recomputation(project):
    """cache k+1 computed from cache k through stack k == computed from the tokens through every stack."""
    import numpy as np

    from stackwise_cli.store.shards import read_hidden_shard
    from stackwise_cli.train.cache import build_cache
    from stackwise_cli.train.grow import grow

    for _ in range(3):
        grow(project)
    _pretend_trained(project, 0, 1)
    build_cache(project, 1, "val")
    inc = build_cache(project, 2, "val")  # incremental: cache 1 exists and is fresh
    inc_h = read_hidden_shard(project.path(inc.shards[0].file)).hidden.clone()
    with project.update() as m:
        m.caches = [c for c in m.caches if c.stack != 1]
    full = build_cache(project, 2, "val")  # cache 2 is still fresh: nothing recomputed
    assert full.shards == inc.shards
    with project.update() as m:
        m.caches = []
    full = build_cache(project, 2, "val")  # now from the tokens
    full_h = read_hidden_shard(project.path(full.shards[0].file)).hidden
    assert np.allclose(inc_h.numpy(), full_h.numpy(), atol=1e-5)  # fp32 cache: equal up to float reassociation


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_atomic_replace_dir_swaps_in_the_new_folder(tmp_path, monkeypatch, exchange):
    import stackwise_cli.store.files as files

    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final, new = tmp_path / "fused", tmp_path / "fused.tmp-1-new"
    final.mkdir()
    (final / "model").write_text("old")
    new.mkdir()
    (new / "model").write_text("new")
    files.atomic_replace_dir(new, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]
    assert (final / "model").read_text() == "new"


def test_a_damaged_cache_shard_is_computed_again(project):
    """verify sends the user to `stackwise cache` for a damaged shard: that command must actually repair it."""
    from stackwise_cli.train.cache import build_cache
    from stackwise_cli.train.grow import grow

    grow(project)
    grow(project)
    _pretend_trained(project, 0)
    entry = build_cache(project, 1, "train")
    victim = project.path(entry.shards[1].file)
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    other = project.path(entry.shards[0].file).stat().st_mtime_ns
    repaired = build_cache(project, 1, "train")
    assert repaired.complete and victim.read_bytes() == good
    assert project.path(entry.shards[0].file).stat().st_mtime_ns == other  # intact shards are kept
    victim.unlink()
    assert build_cache(project, 1, "train").complete and victim.read_bytes() == good
