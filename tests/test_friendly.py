"""Issue 14, part 1: inputs in every common shape, full-width output off a terminal, one-line errors for a full disk,
a read-only project and a recipe that cannot fit, `drop`, `clean`, disk use, and fixes that run as suggested.

CLI tests check the message, the exit code and that a refused command changed nothing.
"""

from __future__ import annotations

import csv
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors import SafetensorError
from typer.testing import CliRunner

from stackwise_cli import preflight
from stackwise_cli.app import app
from stackwise_cli.data.corpus import ReadStats, iter_documents
from stackwise_cli.store.project import Project
from stackwise_cli.train.cache import build_cache
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack

ENV = {"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
REPO = Path(__file__).resolve().parents[1]
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors raises


@pytest.fixture(scope="module")
def _small(tmp_path_factory, tiny_recipe_path) -> Path:
    """The tiny recipe on 60 kB of the built-in corpus: caches and training here take a fraction of a second."""
    from stackwise_cli.data.prepare import prepare
    from stackwise_cli.recipe import load_recipe

    root = tmp_path_factory.mktemp("small") / "proj"
    prepare(Project(root), load_recipe(tiny_recipe_path, ["data.max_bytes=60000"]))
    return root


@pytest.fixture
def project(_small, tmp_path) -> Project:
    """A fresh copy of the small prepared project (empty rack); overrides conftest's larger one."""
    root = tmp_path / "proj"
    shutil.copytree(_small, root)
    return Project(root)


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def one_error(result, *needles: str) -> str:
    """Exit 1, no traceback, exactly one `error:` line, at most a `hint:` line after it; returns both."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = ANSI.sub("", result.stderr).splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(at) == 1, result.stderr
    tail = lines[at[0] + 1 :]
    assert len(tail) <= 1 and all(t.startswith("hint:") for t in tail), result.stderr
    text = "\n".join(lines[at[0] :])
    for n in needles:
        assert n in text, f"{n!r} not in {text!r}"
    return text


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".stackwise.yaml.lock" and p.relative_to(root).parts[0] not in ("logs", "locks")
    }


def manifest(root: Path) -> dict:
    return yaml.safe_load((root / "stackwise.yaml").read_text())


# ------------------------------------------------------------------------------------------------------ inputs


def test_csv_tsv_and_compressed_text_formats(tmp_path: Path):
    import zstandard

    body = io.StringIO()
    w = csv.writer(body)
    w.writerow(["id", "text"])
    w.writerow([1, "first, with a comma\nand a second line"])
    w.writerow([2, ""])  # an empty cell is no document
    w.writerow([3, "third"])
    (tmp_path / "a.csv").write_text(body.getvalue())
    (tmp_path / "b.tsv").write_text("text\tlabel\ntab one\t0\n")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"gzipped text"))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gz json"}\n'))
    (tmp_path / "e.csv.gz").write_bytes(gzip.compress(body.getvalue().encode()))
    (tmp_path / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zst json"}\n'))
    (tmp_path / "g.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zst text"))
    got = {p: [d.text for d in iter_documents([tmp_path / p], None)] for p in sorted(os.listdir(tmp_path))}
    rows = ["first, with a comma\nand a second line", "third"]
    assert got == {
        "a.csv": rows,
        "b.tsv": ["tab one"],
        "c.txt.gz": ["gzipped text"],
        "d.jsonl.gz": ["gz json"],
        "e.csv.gz": rows,
        "f.jsonl.zst": ["zst json"],
        "g.txt.zst": ["zst text"],
    }


def test_text_field_names_the_column_in_every_structured_format(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text('{"body": "j"}\n')
    (tmp_path / "b.csv").write_text("body,text\nc,not this\n")
    pq.write_table(pa.table({"body": ["p"]}), tmp_path / "c.parquet")
    with pa.ipc.new_file(str(tmp_path / "d.arrow"), pa.schema([("body", pa.string())])) as w:
        w.write_table(pa.table({"body": ["a"]}))
    assert [d.text for d in iter_documents([tmp_path], None, "body")] == ["j", "c", "p", "a"]
    from stackwise_cli.errors import DataError

    with pytest.raises(DataError, match=r"no 'body' column \(columns found: text\).*") as e:
        list(iter_documents([_write(tmp_path / "x.csv", "text\nhi\n")], None, "body"))
    assert "--text-field" in e.value.hint


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _save_to_disk(folder: Path, column: str, rows: list[str]) -> None:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream shards, state.json, dataset_info.json."""
    folder.mkdir(parents=True)
    table = pa.table({column: rows})
    with pa.ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {column: {"dtype": "string"}}}))


def test_datasets_save_to_disk_folder_reads_rows_not_its_json(tmp_path: Path):
    _save_to_disk(tmp_path / "ds", "content", ["row one", "row two"])
    assert [d.text for d in iter_documents([tmp_path / "ds"], None, "content")] == ["row one", "row two"]
    # A DatasetDict: its train split only (a test split read into training would leak), and it says so.
    _save_to_disk(tmp_path / "dd" / "train", "text", ["train row"])
    _save_to_disk(tmp_path / "dd" / "test", "text", ["test row"])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    stats = ReadStats()
    assert [d.text for d in iter_documents([tmp_path / "dd"], None, stats=stats)] == ["train row"]
    assert stats.notes == [f"{tmp_path / 'dd'}: read its train split only (not test)"]


def test_prepare_says_the_cut_and_the_small_tokenizer_once_each_and_records_them(tmp_path, tiny_recipe_path):
    from stackwise_cli.data.corpus import iter_documents as read

    docs = [d.text for d in read([], 60_000)]
    src = tmp_path / "corpus.jsonl.gz"
    src.write_bytes(gzip.compress("".join(json.dumps({"body": t}) + "\n" for t in docs).encode()))
    root = tmp_path / "proj"
    result = cli(
        "prepare", "--recipe", tiny_recipe_path, "--input", src, "--text-field", "body",
        "--set", "data.max_bytes=40000", "--set", "model.vocab_size=8192", "-p", root,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    cut = [w for w in warnings if "data.max_bytes=40,000" in w]
    small = [w for w in warnings if "model.vocab_size=8,192" in w]
    assert len(cut) == 1 and len(small) == 1, result.stderr
    m = manifest(root)
    assert m["recipe"]["data"]["text_field"] == "body"
    assert [w for w in m["data"]["warnings"] if "max_bytes" in w or "vocab_size" in w] == [
        cut[0].removeprefix("warning: "),
        small[0].removeprefix("warning: "),
    ]
    assert f"{m['tokenizer']['vocab_size']:,} tokens" in small[0]


# ------------------------------------------------------------------------------------------------------ output


def test_tables_keep_their_width_off_a_terminal(capsys):
    from stackwise_cli.console import print_table

    long = "train-stack-l2r/leftmost-with-a-long-name"
    print_table("plan", ["stage", "bytes", "what it holds on the device"], [[long, 12288123456, "x" * 60]])
    text = capsys.readouterr().out
    assert long in text and "12288123456" in text and "x" * 60 in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) > 80


def test_plain_progress_lines_carry_an_eta(monkeypatch, capsys):
    from stackwise_cli import console

    clock = iter(range(0, 1000, 10))  # every call to monotonic is 10 s later
    monkeypatch.setattr(console.time, "monotonic", lambda: float(next(clock)))
    reporter = console.CliReporter(plain_every_s=0.0)
    with reporter.task("train-stack 0", total=10) as advance:
        advance(2, loss=3.0)  # the first units (set-up included): no rate yet
        advance(2, loss=2.9)  # 2 more in 10 s: the 6 left take 30 s
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train-stack 0: 2/10  loss 3.0000"), lines
    assert lines[1].startswith("train-stack 0: 4/10  eta 30s  loss 2.9000"), lines


# ------------------------------------------------------------------------------------------- one-line errors


def test_disk_full_inside_safetensors_is_one_line_and_changes_nothing(project: Project, monkeypatch):
    grow(project, "right")
    before = snapshot(project.root)

    def full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr("stackwise_cli.store.weights.save_file", full)
    one_error(cli("grow", "-p", project.root), "disk full while writing", "stacks/1.safetensors", "hint: free space")
    assert snapshot(project.root) == before  # no stack 1 in the manifest, no temporary left


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_stack(project: Project, monkeypatch):
    grow(project, "right")
    stack_file = project.path("stacks/0.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr("stackwise_cli.train.checkpoint.save_file", full)
    one_error(cli("train-stack", "0", "--steps", "12", "-p", project.root), "disk full while writing", "ckpt/0")
    assert project.path("stacks/0.safetensors").read_bytes() == stack_file
    assert not list(project.ckpt_dir(0).glob("*"))  # no half-written checkpoint left behind
    monkeypatch.undo()
    assert cli("train-stack", "0", "--steps", "12", "-p", project.root).exit_code == 0  # rerun: it trains


def _read_only(root: Path, monkeypatch) -> None:
    """Make ``root`` unwritable: chmod where that binds (not root), else refuse its writes as the kernel would."""
    if os.geteuid() != 0:
        for p in [root, *root.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        return
    real_open = os.open

    def guarded(path, flags, *args, **kwargs):
        if str(Path(path).resolve()).startswith(str(root.resolve())) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


@pytest.mark.parametrize("command", [["grow"], ["train-stack", "0", "--steps", "5"], ["cache", "0"]])
def test_a_read_only_project_is_one_line_and_changes_nothing(project: Project, monkeypatch, command):
    grow(project, "right")
    before = snapshot(project.root)
    (project.root / "locks").mkdir(exist_ok=True)
    try:
        _read_only(project.root, monkeypatch)
        one_error(cli(*command, "-p", project.root), "read-only", "hint:")
    finally:
        monkeypatch.undo()
        for p in [project.root, *project.root.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    assert snapshot(project.root) == before


# ------------------------------------------------------------------------------------------------- preflight


def test_the_70b_recipe_on_a_24_gb_machine_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 24 * 2**30)
    root = tmp_path / "p70"
    text = one_error(
        cli("prepare", "--recipe", REPO / "recipes/llama/70b.yaml", "-p", root),
        "does not fit",
        "24.0 GiB free",
        "--force",
    )
    need = float(re.search(r"needs ([\d,.]+) GiB", text).group(1).replace(",", ""))
    assert need > 24
    assert not root.exists()


def test_preflight_under_torchrun_checks_one_rank_share(monkeypatch):
    from stackwise_cli.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes/llama/70b.yaml")
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 48 * 2**30)
    monkeypatch.setattr(preflight, "_cuda_present", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(preflight.DoesNotFit):  # one process: the whole stack on one 48 GiB card
        preflight.check_fits(recipe, "stackwise train-stack 0", device="cuda")
    monkeypatch.setenv("WORLD_SIZE", "8")
    preflight.check_fits(recipe, "stackwise train-stack 0", device="cuda")  # FSDP2 over 8 ranks: its share fits


def test_preflight_guards_grow_and_train_stack_and_force_overrides(project: Project, monkeypatch):
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 1000)
    before = snapshot(project.root)
    one_error(cli("grow", "-p", project.root), "does not fit", "0.0 GiB free")
    assert snapshot(project.root) == before
    assert cli("grow", "--force", "-p", project.root).exit_code == 0
    before = snapshot(project.root)
    one_error(cli("train-stack", "0", "-p", project.root), "does not fit", "stackwise train-stack --force")
    assert snapshot(project.root) == before


# ------------------------------------------------------------------------------------------------------ drop


def test_drop_removes_an_untrained_stack_and_keeps_ids_stable(project: Project):
    for _ in range(3):
        grow(project, "right")
    result = cli("drop", "1", "-p", project.root, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["rack"] == [0, 2] and out["removed"] == ["stacks/1.safetensors"] and out["bytes_freed"] > 0
    m = manifest(project.root)
    assert [s["id"] for s in m["rack"]] == [0, 2] and m["next_id"] == 3
    assert m["history"][-1]["command"] == "drop 1"
    assert not project.path("stacks/1.safetensors").exists()
    assert grow(project, "right").id == 3  # never reused
    one_error(cli("drop", "7", "-p", project.root), "no stack with id 7")


def test_drop_refuses_a_trained_stack_unless_forced_and_never_under_a_dependent(project: Project):
    grow(project, "right")
    train_stack(project, 0, steps=3)
    grow(project, "right")
    build_cache(project, 1, "train")
    train_stack(project, 1, steps=3)
    before = snapshot(project.root)
    one_error(cli("drop", "0", "-p", project.root), "stack 0 is trained", "--force")
    one_error(cli("drop", "0", "--force", "-p", project.root), "stack(s) 1 trained on stack 0", "drop 1 --force")
    assert snapshot(project.root) == before
    assert cli("drop", "1", "--force", "-p", project.root).exit_code == 0  # the outermost first
    assert not project.path("cache/1").exists()  # its cache went with it
    assert cli("drop", "0", "--force", "-p", project.root).exit_code == 0
    assert manifest(project.root)["rack"] == []


def _fix_commands(fix: str) -> list[list[str]]:
    return [shlex.split(c)[1:] for c in re.findall(r"`(stackwise [^`]+)`", fix)]


@pytest.mark.parametrize("trained", [False, True])
def test_every_fix_verify_suggests_for_a_corrupt_stack_runs(project: Project, trained: bool):
    grow(project, "right")
    if trained:
        train_stack(project, 0, steps=3)
    project.path("stacks/0.safetensors").write_bytes(b"\x00not a stack" * 8)
    result = cli("verify", "-p", project.root, "--json")
    assert result.exit_code == 1
    (problem,) = [p for p in json.loads(result.stdout)["problems"] if p["file"] == "stacks/0.safetensors"]
    commands = _fix_commands(problem["fix"])
    assert commands and all(c[0] in ("drop", "grow") for c in commands), problem["fix"]
    for c in commands:
        assert cli(*c).exit_code == 0, (c, problem["fix"])
    assert cli("verify", "-p", project.root).exit_code == 0


# ------------------------------------------------------------------------------------------ clean and disk use


def test_clean_removes_what_no_stage_needs_says_what_it_frees_and_keeps_the_flops(project: Project):
    grow(project, "right")
    train_stack(project, 0, steps=3)
    grow(project, "right")
    build_cache(project, 1, "train")
    stale = project.path("ckpt/0/step-00000002")  # a trained stack's leftover checkpoint: no run resumes from it
    stale.mkdir(parents=True)
    (stale / "weights.safetensors").write_bytes(b"x" * 1000)
    orphan = project.path("stacks/9.safetensors")  # a file the manifest does not list
    orphan.write_bytes(b"y" * 500)
    flops = manifest(project.root)["flops"]

    before = snapshot(project.root)
    dry = cli("clean", "--dry-run", "-p", project.root, "--json")
    assert dry.exit_code == 0, dry.output
    assert snapshot(project.root) == before  # a dry run removes nothing
    plan = json.loads(dry.stdout)
    assert sorted(i["path"] for i in plan["removed"]) == ["ckpt/0", "stacks/9.safetensors"]
    assert plan["bytes_freed"] == 1500
    assert [i["path"] for i in plan["kept"]] == ["cache/1/train"]  # train-stack 1 reads it

    result = cli("clean", "-p", project.root)
    assert result.exit_code == 0, result.output
    assert "freed 1.5 kB in 2 item(s)" in result.stdout and "kept cache/1/train" in result.stdout
    assert not stale.exists() and not orphan.exists() and project.path("cache/1/train").exists()

    result = cli("clean", "--caches", "-p", project.root, "--json")
    assert result.exit_code == 0, result.output
    (item,) = json.loads(result.stdout)["removed"]
    assert item["path"] == "cache/1/train" and item["needed"] and "train-stack 1" in item["why"]
    assert not project.path("cache/1/train").exists()
    m = manifest(project.root)
    assert m["flops"] == flops  # the FLOPs that computed the removed cache still count
    assert m["history"][-1]["command"] == "clean --caches"
    status = json.loads(cli("status", "-p", project.root, "--json").stdout)
    (problem,) = status["problems"]
    assert problem["what"] == "removed" and _fix_commands(problem["fix"]) == [
        ["cache", "1", "--split", "train", "-p", str(project.root)]
    ]
    assert cli(*_fix_commands(problem["fix"])[0]).exit_code == 0  # the fix runs, and the cache is back
    assert json.loads(cli("status", "-p", project.root, "--json").stdout)["problems"] == []


def test_status_shows_disk_use_by_part(project: Project):
    grow(project, "right")
    result = cli("status", "-p", project.root, "--json")
    disk = json.loads(result.stdout)["disk"]
    assert disk["total"] == sum(v for k, v in disk.items() if k != "total")
    assert disk["data"] > 0 and disk["stacks"] == project.path("stacks/0.safetensors").stat().st_size
    text = cli("status", "-p", project.root).stdout
    assert re.search(r"disk: [\d.]+ (kB|MB) \(data [\d.]+ (kB|MB)", text), text


def test_clean_keeps_the_resume_point_of_a_run_unless_told(project: Project):
    grow(project, "right")
    with project.update() as m:
        m.stack(0).state = "training"  # as an interrupted train-stack leaves it
    for step in (10, 20):
        folder = project.ckpt_dir(0) / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    result = json.loads(cli("clean", "-p", project.root, "--json").stdout)
    assert [i["path"] for i in result["removed"]] == ["ckpt/0/step-00000010"]
    assert [i["path"] for i in result["kept"]] == ["ckpt/0/step-00000020"]
    assert "resume point of `train-stack 0`" in result["kept"][0]["why"]
    result = json.loads(cli("clean", "--checkpoints", "-p", project.root, "--json").stdout)
    assert [(i["path"], i["needed"]) for i in result["removed"]] == [("ckpt/0/step-00000020", True)]
    assert not project.ckpt_dir(0).exists()


@pytest.mark.parametrize(
    ("code", "needle"), [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk full while writing /p/logs/x.json")]
)
def test_a_write_no_writer_handled_is_still_one_line(project: Project, monkeypatch, code, needle):
    def fails(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/p/logs/x.json")

    monkeypatch.setattr("stackwise_cli.store.status.status", fails)
    one_error(cli("status", "-p", project.root), needle)


def test_other_os_errors_are_not_dressed_up(project: Project, monkeypatch):
    def fails(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/p/x")

    monkeypatch.setattr("stackwise_cli.store.status.status", fails)
    result = cli("status", "-p", project.root)
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EIO  # a bug stays visible
