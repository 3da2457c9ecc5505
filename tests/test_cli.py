"""The command line: every mistake is one line and exit 2 before any model loads; help shows defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from visa import __version__
from visa.cli import SELECT_DEFAULTS, app
from visa.selection import SelectionOptions

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def dataset(folder: Path, n: int = 6, *, missing: int = 0) -> Path:
    """``n`` LLaVA records on small images; the last ``missing`` of them name files that do not exist."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"img/{i}.png"
        if i < n - missing:
            Image.new("RGB", (16 + i, 12), (10 * i, 40, 90)).save(folder / name)
        records.append({"id": f"r{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": f"Thing {i}."}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def logging_recipe(tmp_path: Path) -> tuple[Path, Path]:
    """A recipe whose one agent writes a file when it is set up (where a model would load)."""
    log = tmp_path / "setup.log"
    recipe = tmp_path / "logged.yaml"
    recipe.write_text(
        "name: logged\nexecution: {shard_size: 4}\nscores:\n  sc:\n    agents:\n"
        f"      - {{name: width, type: 'agents_for_tests:SetupLog', params: {{setup_log: '{log}'}}}}\n"
    )
    return recipe, log


def one_line_exit_2(code: int, stderr: str, *fragments: str, after_progress: bool = False) -> None:
    """Exit 2 with one ``error:`` line; before any work (not ``after_progress``) nothing else."""
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if after_progress:
        lines = [line for line in lines if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and "Value error" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_version_flag_and_command() -> None:
    assert invoke("--version")[:2] == (0, f"{__version__}\n")
    assert invoke("version")[:2] == (0, f"{__version__}\n")


@pytest.mark.parametrize("command", ["score", "run", "select", "report", "demo", "bench noise"])
def test_help_shows_defaults_and_plain_text(command: str) -> None:
    code, text, _ = invoke(*command.split(), "--help")
    assert code == 0
    text = re.sub(r"\s+", " ", text)
    if command in ("score", "run", "demo", "bench noise"):
        assert "--recipe" in text and "[default: embedded]" in text
    if command in ("score", "run"):
        assert "visa[ray]" in text  # not eaten as markup
    if command == "select":
        assert text.count("[default: ") >= len(SELECT_DEFAULTS)


def test_select_defaults_shown_are_the_options_defaults() -> None:
    unset = {"budget": "all", "visual_weights": "from the probes", "quota_field": "none", "max_per_image": "off"}
    for name, shown in SELECT_DEFAULTS.items():
        default = SelectionOptions.model_fields[name].default
        if default is None:
            assert shown == unset[name], name
        elif isinstance(default, bool):
            assert shown == ("dedupe" if default else "no-dedupe"), name
        elif isinstance(default, (int, float)):
            assert float(shown) == default, name
        else:
            assert shown == default, name


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--budget", "2.5"], ["budget", "2.5"]),
        (["--budget", "0"], ["budget", "nothing"]),
        (["--budget", "0%"], ["budget", "nothing"]),
        (["--budget", "10", "--image-root", "nowhere"], ["--image-root is not a folder"]),
        (["--budget", "10", "--executor", "spark"], ["--executor"]),
        (["--budget", "10", "--recipe", "embeded"], ["did you mean 'embedded'"]),
    ],
)
def test_run_rejects_mistakes_before_any_model_loads(tmp_path: Path, extra: list[str], fragments: list[str]) -> None:
    data = dataset(tmp_path / "d")
    recipe, log = logging_recipe(tmp_path)
    args = ["run", "--data", str(data), "--out", str(tmp_path / "run"), "--recipe", str(recipe), *extra]
    if "--recipe" in extra:
        args = [a for a in args if a != str(recipe)]
        args.remove("--recipe")
    code, _, err = invoke(*args)
    one_line_exit_2(code, err, *fragments)
    assert not log.exists() and not (tmp_path / "run").exists()


def test_paths_are_checked_first(tmp_path: Path) -> None:
    data = dataset(tmp_path / "d")
    recipe, log = logging_recipe(tmp_path)
    (tmp_path / "file").write_text("x")
    cases = [
        (["--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "r")], ["input not found"]),
        (["--data", str(tmp_path / "shards" / "*.tar"), "--out", str(tmp_path / "r")], ["no .tar shards"]),
        (["--data", str(tmp_path / "file"), "--out", str(tmp_path / "r")], ["unsupported input format"]),
        (["--data", str(data), "--out", str(tmp_path / "file")], ["exists and is not a folder"]),
        (["--data", str(data), "--out", str(tmp_path / "file" / "r")], ["--out", "cannot create"]),
    ]
    for args, fragments in cases:
        code, _, err = invoke("score", "--recipe", str(recipe), *args)
        one_line_exit_2(code, err, *fragments)
    assert not log.exists()


def test_wrong_image_root_stops_before_models_with_a_hint(tmp_path: Path) -> None:
    data = dataset(tmp_path / "d", n=8, missing=7)
    recipe, log = logging_recipe(tmp_path)
    code, _, err = invoke("score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "r"))
    one_line_exit_2(code, err, "3 of the first 4 records", "img/1.png", "--image-root")
    assert not log.exists() and not (tmp_path / "r").exists()

    # a later shard that tips the share over one half stops the run too (the first shard was fine)
    data = dataset(tmp_path / "e", n=8, missing=4)
    code, _, err = invoke("score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "s"))
    assert code == 0, err  # 4 of 8 is not more than half
    data = dataset(tmp_path / "f", n=12, missing=7)
    code, _, err = invoke("score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "t"))
    one_line_exit_2(code, err, "7 of the first 12 records", "img/5.png", "--image-root", "another --out",
                    after_progress=True)

    code, _, err = invoke("score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "u"),
                          "--allow-missing-images")
    assert code == 0, err


def test_empty_input_is_exit_2(tmp_path: Path) -> None:
    recipe, log = logging_recipe(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    code, _, err = invoke("score", "--recipe", str(recipe), "--data", str(tmp_path / "empty.jsonl"),
                          "--out", str(tmp_path / "r"))
    one_line_exit_2(code, err, "holds no records")
    assert not log.exists()


def test_bench_noise_reads_input_through_the_tolerant_readers(tmp_path: Path) -> None:
    from visa.bench.noise import BenchError, read_records

    good = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    lines = [json.dumps(dict(good, id=f"r{i}")) for i in range(30)]
    lines[21] = '{"id": "broken", "conversations": ['
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    records = read_records(tmp_path / "data.jsonl")
    assert [r["id"] for r in records] == [f"r{i}" for i in range(30) if i != 21]
    with pytest.raises(BenchError, match="not found"):
        read_records(tmp_path / "none.jsonl")


def test_metadata_columns_are_meta_field_for_nested_meta_and_top_level_fields(tmp_path: Path) -> None:
    from visa.assemble import meta_fields

    assert meta_fields({"source": "coco", "meta": {"kind": "clean", "photo": ["a", "b"], "size": {"w": 3}}}) == {
        "meta.source": "coco", "meta.kind": "clean", "meta.size.w": 3,
    }
    assert meta_fields({"kind": "top", "meta": {"kind": "inner"}}) == {"meta.kind": "inner"}
    assert meta_fields({"meta": "plain"}) == {"meta.meta": "plain"}

    data = dataset(tmp_path / "d", n=4)
    records = json.loads(data.read_text())
    for i, record in enumerate(records):
        record["meta"] = {"kind": "photo" if i % 2 else "chart"}
        record["source"] = f"s{i % 3}"
    data.write_text(json.dumps(records))
    recipe, _ = logging_recipe(tmp_path)
    code, _, err = invoke("score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "r"))
    assert code == 0, err
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "r" / "scores.parquet")
    assert table.column("meta.kind").to_pylist() == ["chart", "photo", "chart", "photo"]
    assert table.column("meta.source").to_pylist() == ["s0", "s1", "s2", "s0"]
    assert not [c for c in table.column_names if c.startswith("meta.meta")]


def scored_run(tmp_path: Path, n: int = 6) -> Path:
    """A finished run with two image-level families (sc: image width, oa: brightness) and metadata."""
    data = dataset(tmp_path / "d", n=n)
    records = json.loads(data.read_text())
    for i, record in enumerate(records):
        record["meta"] = {"kind": "photo" if i % 2 else "chart"}
        record["source"] = f"s{i % 3}"
    data.write_text(json.dumps(records))
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        "name: two\nexecution: {shard_size: 4}\nscores:\n"
        "  sc:\n    agents: [{name: width, type: 'agents_for_tests:SetupLog'}]\n"
        "  oa:\n    agents: [{name: light, type: 'agents_for_tests:MeanBrightness'}]\n"
    )
    code, _, err = invoke("score", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"))
    assert code == 0, err
    return tmp_path / "run"


def test_select_option_mistakes_are_one_line(tmp_path: Path) -> None:
    run = scored_run(tmp_path)
    code, _, err = invoke("select", str(run), "--visual-weights", "dpp=2")
    one_line_exit_2(code, err, "unknown visual family 'dpp'", "did you mean 'dp'")
    code, _, err = invoke("select", str(run), "--budget", "3", "--quota-field", "meta.kin")
    one_line_exit_2(code, err, "quota field 'meta.kin'", "did you mean 'meta.kind'",
                    "metadata columns: meta.kind, meta.source")
    code, _, err = invoke("select", str(run), "--budget", "0")
    one_line_exit_2(code, err, "budget 0 selects nothing")
    assert not (run / "selection.parquet").exists()


def test_partial_visual_weights_keep_the_other_families(tmp_path: Path) -> None:
    run = scored_run(tmp_path)
    code, _, err = invoke("select", str(run), "--visual-weights", "oa=2", "--no-records")
    assert code == 0, err
    selection = json.loads((run / "run.json").read_text())["selection"]
    assert selection["visual_weights"] == {"sc": 1.0, "oa": 2.0}
    assert any("dp" in note for note in selection["notes"])  # a default family this run does not have


def test_no_records_removes_what_described_the_previous_selection(tmp_path: Path) -> None:
    run = scored_run(tmp_path)
    code, _, err = invoke("select", str(run), "--budget", "4")
    assert code == 0, err
    (run / "report.html").write_text("<html>old</html>")
    assert (run / "selected.json").is_file() and (run / "dataset_info.json").is_file()
    code, _, err = invoke("select", str(run), "--budget", "2", "--no-records")
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["probes", "run.json", "scores.parquet", "selection.parquet", "work"]
    notes = json.loads((run / "run.json").read_text())["selection"]["notes"]
    assert any("report.html" in note and "selected.json" in note for note in notes)


def test_nothing_selected_is_exit_2_with_the_reasons(tmp_path: Path) -> None:
    data = dataset(tmp_path / "d", n=4, missing=4)
    recipe, _ = logging_recipe(tmp_path)
    code, _, err = invoke("run", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "r"),
                          "--budget", "2", "--allow-missing-images")
    one_line_exit_2(code, err, "nothing selected from 4 rows (4 error)", after_progress=True)
    assert (tmp_path / "r" / "selection.parquet").is_file() and not (tmp_path / "r" / "selected.json").exists()


def test_run_checks_the_recipes_selection_section_before_scoring(tmp_path: Path) -> None:
    data = dataset(tmp_path / "d")
    recipe, log = logging_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "selection: {visual_weights: {scc: 2}}\n")
    code, _, err = invoke("run", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "r"),
                          "--budget", "2")
    one_line_exit_2(code, err, "unknown visual family 'scc'", "did you mean 'sc'")
    assert not log.exists() and not (tmp_path / "r").exists()


def test_every_output_follows_the_umask(tmp_path: Path) -> None:
    import os

    data = dataset(tmp_path / "d")
    recipe, _ = logging_recipe(tmp_path)
    old = os.umask(0o027)
    try:
        code, _, err = invoke("run", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "r"),
                              "--budget", "3")
    finally:
        os.umask(old)
    assert code == 0, err
    paths = [tmp_path / "r", *(tmp_path / "r").rglob("*")]
    assert {"scores.parquet", "run.json", "selection.parquet", "selected.json", "dataset_info.json",
            "report.html"} <= {p.name for p in paths}
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in paths}
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o640}, modes
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o750}, modes


def test_score_and_select_on_webdataset_shards_from_the_command_line(tmp_path: Path) -> None:
    import io
    import tarfile

    (tmp_path / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(tmp_path / "shards" / f"train-{shard}.tar", "w") as tar:
            for i in range(3):
                key = f"{shard}{i:02d}"
                buf = io.BytesIO()
                Image.new("RGB", (10 + 5 * i + shard, 8), (30 * i, 90, 20)).save(buf, format="PNG")
                record = {"conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                            {"from": "gpt", "value": f"Thing {key}."}]}
                for name, data in ((f"{key}.json", json.dumps(record).encode()), (f"{key}.png", buf.getvalue())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    recipe, _ = logging_recipe(tmp_path)
    for data in (str(tmp_path / "shards"), str(tmp_path / "shards" / "train-*.tar")):
        out = tmp_path / ("run-glob" if "*" in data else "run-folder")
        code, _, err = invoke("run", "--recipe", str(recipe), "--data", data, "--out", str(out), "--budget", "4")
        assert code == 0, err
        shards = sorted((out / "selected").glob("*.tar"))
        with tarfile.open(shards[0]) as tar:
            names = tar.getnames()
        selected = json.loads((out / "run.json").read_text())["selection"]["selected"]
        assert selected == 3  # half of the 6 images survive the image stage
        assert len(names) == 2 * selected and {n.rsplit(".", 1)[1] for n in names} == {"json", "png"}
        assert not (out / "dataset_info.json").exists()
