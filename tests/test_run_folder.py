"""The run folder: one owner of its paths, a typed record that reads what the last release wrote,
one atomic writer whose files follow the umask, and the module boundaries around them."""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from visa import families as fam
from visa.run_folder import (
    RECORD_VERSION,
    SUBSET_NAMES,
    RunFolder,
    RunFolderError,
    RunRecord,
    atomic_write,
    atomic_write_folder,
    atomic_write_table,
)

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src" / "visa"
#: A run folder written by visa 0.1.0 (the release before RunRecord; its work/ left out):
#: `visa score` with image statistics, Felzenszwalb, a test image agent of family ``light`` and a
#: sample agent over 9 records (4 gradient images, one text-only), then `visa select --budget 50%`.
RELEASE_RUN = TESTS / "data" / "release_run"


def copy_release_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(RELEASE_RUN, run)
    return run


# ---------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------
def test_a_record_written_by_the_release_loads_typed(tmp_path: Path):
    raw = json.loads((RELEASE_RUN / "run.json").read_text())
    assert "record_version" not in raw  # written before the key existed
    record = RunFolder(RELEASE_RUN).read_record()
    assert record.visa_version == raw["visa_version"]
    assert [a.column for a in record.agents] == [a["column"] for a in raw["agents"]]
    assert {a.score: a.unit for a in record.agents} == {a["score"]: a["unit"] for a in raw["agents"]}
    assert record.input is not None and record.input.fingerprint == raw["input"]["fingerprint"]
    assert record.counts.records == raw["counts"]["records"] == 9
    assert record.timings.agents["sc.felzenszwalb"].items == raw["timings"]["agents"]["sc.felzenszwalb"]["items"]
    assert record.selection is not None and record.selection.selected == raw["selection"]["selected"]
    assert record.shapley["sc"].weight_of() == raw["shapley"]["sc"]["weights"]
    # nothing is lost or invented on the way back
    assert record.to_json() == raw


def test_a_rewritten_record_keeps_every_key_and_gains_the_version(tmp_path: Path):
    run = copy_release_run(tmp_path)
    folder = RunFolder(run)
    before = json.loads(folder.run_json.read_text())
    record = folder.read_record()
    record.selection = {"selected": 1}
    folder.write_record(record)
    after = json.loads(folder.run_json.read_text())
    assert after.pop("record_version") == RECORD_VERSION
    assert after.pop("selection") == {"selected": 1}
    before.pop("selection")
    assert after == before
    # the same record gives the same bytes
    first = folder.run_json.read_bytes()
    folder.write_record(folder.read_record())
    assert folder.run_json.read_bytes() == first


def test_selection_and_report_run_on_the_release_run_folder(tmp_path: Path):
    from visa.report import build_report
    from visa.selection import SelectionOptions, select

    run = copy_release_run(tmp_path)
    result = select(run, SelectionOptions(budget=4), write_records=False)
    assert result.summary["selected"] == 4
    assert set(result.shapley) == {"sc", "light", "words"}  # image statistics are descriptive: never fused
    units = {family: report["unit"] for family, report in result.shapley.items()}
    assert units == {"sc": "image", "light": "image", "words": "sample"}  # light: from the run's agents
    text = build_report(run, gallery_size=0).read_text(encoding="utf-8")
    assert "Image statistics" in text and "SC · segmentation complexity" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"record_version": 7, "visa_version": "9.0.0"}', r"written by visa 9\.0\.0 in record layout 7"),
        ('{"visa_version": "0.1.0", "agents": [{"column": 3}]}', r"\(written by visa 0\.1\.0\): field agents\.0"),
        ('{"counts": {"records": "many"}}', r"field counts\.records"),
        ("[1, 2]", "must hold a JSON object"),
        ("{not json", "not readable JSON"),
    ],
)
def test_an_unreadable_record_is_one_line_naming_what_and_which_version(tmp_path: Path, content, message):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(RunFolderError, match=message) as err:
        RunFolder(tmp_path).read_record()
    assert "\n" not in str(err.value)


def test_missing_record_and_scores_are_clear(tmp_path: Path):
    folder = RunFolder(tmp_path)
    with pytest.raises(RunFolderError, match="no run.json"):
        folder.read_record()
    assert folder.read_record_or_empty() == RunRecord()
    with pytest.raises(RunFolderError, match="no scores.parquet"):
        folder.require_scores()
    with pytest.raises(RunFolderError, match="run folder not found"):
        RunFolder(tmp_path / "nope").require_dir()


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", b"{}")
        atomic_write_table(tmp_path / "b.parquet", pa.table({"x": [1]}))
        RunFolder(tmp_path).write_record(RunRecord())
    finally:
        os.umask(old)
    for name in ("a.json", "b.parquet", "run.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "scores.parquet"
    target.write_bytes(b"old")

    def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]


def test_a_folder_replaces_the_old_one_whole_and_follows_the_umask(tmp_path: Path):
    target = tmp_path / "selected"
    target.mkdir()
    (target / "stale.tar").write_bytes(b"old")

    def fill(folder: Path) -> None:
        (folder / "part-000000.tar").write_bytes(b"new")
        (folder / "sub").mkdir()
        (folder / "sub" / "data.arrow").write_bytes(b"rows")

    old = os.umask(0o077)
    try:
        atomic_write_folder(target, fill)
    finally:
        os.umask(old)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "part-000000.tar", "sub", "sub/data.arrow"
    ]
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "part-000000.tar").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selected"]


def test_a_failed_folder_write_leaves_the_old_folder_and_no_temporary(tmp_path: Path):
    target = tmp_path / "selected"
    target.mkdir()
    (target / "part-000000.tar").write_bytes(b"old")

    def broken(folder: Path) -> None:
        (folder / "part-000000.tar").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_folder(target, broken)
    assert (target / "part-000000.tar").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selected"]


# ---------------------------------------------------------------------------------------------
# Module boundaries
# ---------------------------------------------------------------------------------------------
def _string_constants(path: Path) -> set[str]:
    """Every string literal of a module that is not a docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_only_the_run_folder_module_spells_run_file_names():
    """As a path: messages may name a file, but no other module builds a path from a file name."""
    # the subset files too; the bare folder name "selected" is also the selection's column name
    names = {"run.json", "scores.parquet", "selection.parquet", "dataset_info.json", "report.html", "work",
             *(name for name in SUBSET_NAMES if "." in name)}
    # a Hugging Face datasets folder has a dataset_info.json of its own: the reader detects it by name
    allowed = {("readers/hf_datasets.py", "dataset_info.json")}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative == "run_folder.py":
            continue
        for text in _string_constants(path):
            if text.strip("/") in names and (relative, text) not in allowed:
                found.append(f"{relative}: {text!r}")
    assert found == []


def test_family_constants_live_in_the_families_module():
    spelled = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative == "families.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.Set, ast.List)):
                items = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(items & set(fam.FAMILIES)) >= 2:
                    spelled.append(f"{relative}:{node.lineno}")
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                if len(keys & set(fam.FAMILIES)) >= 2:
                    spelled.append(f"{relative}:{node.lineno}")
    assert spelled == []


def test_loading_a_recipe_does_not_import_the_selection():
    code = (
        "import sys\n"
        "from visa.recipe import load_recipe\n"
        "load_recipe('embedded')\n"
        "print(sorted(m for m in sys.modules if m.startswith('visa.selection') or m == 'visa.fusion'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == ["visa.selection", "visa.selection.options"]
