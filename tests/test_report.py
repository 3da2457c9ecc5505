"""The HTML report: content, escaping, robustness, and what a real browser shows."""

from __future__ import annotations

import html
import json
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import browser
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visa.readers import open_input
from visa.report import ReportError, build_report

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HOSTILE = "<script>alert(1)</script>"
HOSTILE_ATTR = '"><img src=x onerror=alert(2)>'
SCORES = ("sc", "oa", "dp", "pt", "im")


# ---------------------------------------------------------------------------------------------
# A small run folder over examples/llava.json with synthetic scores
# ---------------------------------------------------------------------------------------------
def write_input(folder: Path) -> list[dict | None]:
    """examples/llava.json as JSONL plus a hostile record, a missing image and a malformed line."""
    records = json.loads((EXAMPLES / "llava.json").read_text(encoding="utf-8"))
    records.append(
        {
            "id": f"evil-{HOSTILE}",
            "image": "images/chelsea.jpg",
            "conversations": [
                {"from": "human", "value": f"<image>\n{HOSTILE} What is this {HOSTILE_ATTR}?"},
                {"from": "gpt", "value": f"A cat. {HOSTILE}"},
            ],
            "meta": {"kind": HOSTILE, "photo": "chelsea"},
        }
    )
    records.append(
        {
            "id": "lost-image",
            "image": "images/does-not-exist.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "Nothing."},
            ],
            "meta": {"kind": "clean", "photo": "none"},
        }
    )
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(10, '{"id": "broken", "conversations": [')
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return records[:10] + [None] + records[10:]


def record_columns(records: list) -> tuple[list, ...]:
    """Per record: sample id, first image key, all image keys, error kind and message, two meta fields."""
    sample_ids, keys, kinds, errors, metas_kind, metas_photo = [], [], [], [], [], []
    all_keys: list[list[str]] = []
    for i, rec in enumerate(records):
        if rec is None:
            sample_ids.append(f"h:malformed{i}")
            keys.append(None)
            all_keys.append([])
            kinds.append("malformed")
            errors.append(f"line {i + 1}: invalid JSON at column 40: {HOSTILE}")
            metas_kind.append(None)
            metas_photo.append(None)
        else:
            sample_ids.append(rec["id"])
            image = rec.get("image")
            images = [] if image is None else image if isinstance(image, list) else [image]
            keys.append("k-" + images[0].rsplit("/", 1)[-1] if images else None)
            all_keys.append(["k-" + i.rsplit("/", 1)[-1] for i in images])
            missing = image == "images/does-not-exist.jpg"
            kinds.append("missing" if missing else None)
            errors.append(f"missing: {image} does not exist" if missing else None)
            metas_kind.append(rec.get("meta", {}).get("kind"))
            photo = rec.get("meta", {}).get("photo")
            metas_photo.append(photo if not isinstance(photo, list) else None)  # as assembly keeps scalars
    return sample_ids, keys, all_keys, kinds, errors, metas_kind, metas_photo


def make_run(folder: Path, *, n_agents_sc: int = 2, with_selection: bool = True, seed: int = 0) -> Path:
    """A run folder like `visa score` + `visa select` write, with plausible synthetic values."""
    folder.mkdir(parents=True, exist_ok=True)
    records = write_input(folder)
    rng = np.random.default_rng(seed)
    n = len(records)
    sample_ids, keys, all_keys, kinds, errors, metas_kind, metas_photo = record_columns(records)
    metas_uid = [f"uid-{i}" for i in range(n)]
    error = np.array([k is not None for k in kinds])
    image_names = sorted({k for k in keys if k})
    image_value = {k: rng.normal(size=4) for k in image_names}

    def image_level(j: int, scale: float, offset: float, integer: bool = False) -> np.ndarray:
        out = np.array(
            [
                np.nan if (k is None or e) else offset + scale * image_value[k][j]
                for k, e in zip(keys, error, strict=True)
            ]
        )
        return np.round(out) if integer else out

    columns: dict[str, pa.Array] = {
        "row": pa.array(np.arange(n), pa.int64()),
        "line": pa.array(np.arange(n) + 1, pa.int64()),
        "sample_id": pa.array(sample_ids, pa.string()),
        "image_key": pa.array(keys, pa.string()),
        "image_keys": pa.array(all_keys, pa.list_(pa.string())),
        "error_kind": pa.array(kinds, pa.string()),
        "error": pa.array(errors, pa.string()),
        "meta.meta.kind": pa.array(metas_kind, pa.string()),
        "meta.meta.photo": pa.array(metas_photo, pa.string()),
        "meta.uid": pa.array(metas_uid, pa.string()),
    }
    agents = {
        "sc.felzenszwalb": image_level(0, 12, 40, integer=True),
        "oa.tagger": image_level(1, 1.5, 4),
        "dp.judge": np.clip(image_level(2, 1, 3, integer=True), 1, 5),
        "pt.lm": np.where(error, np.nan, rng.gamma(2.0, 2.0, n)),
        "im.lm": np.where(error, np.nan, rng.normal(0.3, 0.5, n)),
        "im.pmi": np.where(error, np.nan, rng.normal(0.2, 0.4, n)),
    }
    if n_agents_sc > 1:
        agents["sc.ocr"] = image_level(0, 3, 5, integer=True) + np.where(
            np.isnan(agents["sc.felzenszwalb"]), np.nan, rng.integers(0, 3, n)
        )
    for column, values in agents.items():
        columns[column] = pa.array(values, pa.float64(), mask=np.isnan(values))
    labels = [
        None if (k is None or e) else ["cat", "sofa", HOSTILE][: 1 + int(abs(image_value[k][3]) * 2) % 3]
        for k, e in zip(keys, error, strict=True)
    ]
    columns["oa.tagger.labels"] = pa.array(labels, pa.list_(pa.string()))
    fused = {}
    for family in SCORES:  # the mean of z-scored agents; rows where every agent is null stay null
        members = [v for c, v in agents.items() if c.split(".")[0] == family]
        z = [(v - np.nanmean(v)) / np.nanstd(v) for v in members]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-null rows
            fused[family] = np.nanmean(np.vstack(z), axis=0) if len(z) > 1 else z[0]
        columns[family] = pa.array(fused[family], pa.float64(), mask=np.isnan(fused[family]))
    pq.write_table(pa.table(columns), folder / "scores.parquet", row_group_size=32)

    shapley = {
        "sc": {
            "unit": "image",
            "agents": ["sc.felzenszwalb", "sc.ocr"],
            "weights": {"sc.felzenszwalb": 0.62, "sc.ocr": 0.38},
            "exact": True,
            "calibration_size": 18,
            "calibration_pool": 18,
            "seed": 0,
            "pearson": [[1.0, 0.71], [0.71, 1.0]],
            "standardisation": {},
            "excluded": {},
        },
        "im": {
            "unit": "sample",
            "agents": ["im.lm", "im.pmi"],
            "weights": [0.55, 0.45],
            "exact": True,
            "calibration_size": 70,
            "seed": 0,
            "pearson": [[1.0, 0.12], [0.12, None]],
            "excluded": {"im.pmi": f"constant {HOSTILE}"},
        },
    }
    run = {
        "visa_version": "0.1.0",
        "created": "2026-11-29T12:00:00+00:00",
        "input": {
            "path": str(folder / "data.jsonl"),
            "format": "jsonl",
            "image_root": str(EXAMPLES),
            "fingerprint": open_input(folder / "data.jsonl").fingerprint(),
        },
        "recipe": {"name": "synthetic", "description": f"test recipe {HOSTILE}"},
        "agents": [
            {
                "column": c,
                "score": c.split(".")[0],
                "name": c.split(".")[1],
                "unit": "image" if c.split(".")[0] in ("sc", "oa", "dp") else "sample",
                "models": {"tiny-model": "rev1"} if c == "pt.lm" else {},
            }
            for c in agents
        ],
        "counts": {
            "records": n,
            "ok": int((~error).sum()),
            "unique_images": len(image_names) + 1,
            "text_only": sum(1 for k, e in zip(keys, error, strict=True) if k is None and not e),
            "errors": {"malformed": 1, "missing": 1},
            "malformed": 1,
            "malformed_lines": [11],
        },
        "timings": {
            "agents": {c: {"items": 19, "errors": 0, "seconds": 1.5} for c in agents},
            "scoring_seconds": 12.0,
            "total_seconds": 13.5,
        },
        "shapley": shapley,
    }
    if with_selection:
        selection, summary = synthetic_selection(columns, fused, error)
        pq.write_table(selection, folder / "selection.parquet")
        run["selection"] = summary
    (folder / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    return folder


def synthetic_selection(columns: dict, fused: dict, error: np.ndarray) -> tuple[pa.Table, dict]:
    n = len(error)
    keys = columns["image_key"].to_pylist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # text-only and error rows
        visual = np.nanmean(np.vstack([fused["sc"], fused["oa"], fused["dp"]]), axis=0)
    reason = np.array([None] * n, dtype=object)
    reason[error] = "error"
    cut = np.nanmedian(visual)
    reason[np.equal(reason, None) & (visual < cut)] = "image_below_cut"
    reason[np.equal(reason, None) & (fused["im"] <= -0.3)] = "im_nonpositive"
    alive = np.flatnonzero(np.equal(reason, None))
    order = alive[np.argsort(-fused["im"][alive], kind="stable")]
    reason[order[12:]] = "budget"
    chosen = order[:12]
    selected = np.zeros(n, dtype=bool)
    selected[chosen] = True
    rank = np.full(n, np.nan)
    rank[chosen] = np.arange(1, chosen.size + 1)
    table = pa.table(
        {
            "row": pa.array(np.arange(n), pa.int64()),
            "sample_id": columns["sample_id"],
            "selected": pa.array(selected),
            "rank": pa.array(rank, pa.int64(), mask=np.isnan(rank), from_pandas=True),
            "visual_score": pa.array(visual, pa.float64(), mask=np.isnan(visual)),
            "instruction_score": pa.array(fused["im"], pa.float64(), mask=np.isnan(fused["im"])),
            "reason": pa.array(list(reason), pa.string()),
        }
    )
    dropped = {r: int(np.sum(reason == r)) for r in ("error", "image_below_cut", "im_nonpositive", "budget")}
    summary = {
        "pool": n,
        "budget": 12,
        "budget_rows": 12,
        "selected": 12,
        "dropped": dropped,
        "images": {"unique": len({k for k in keys if k}), "kept": 9},
        "ranked_by": "instruction_score",
        "pt_cut": None,
        "options": {"image_keep": 0.5, "im_min": 0.0},
        "notes": [f"a note {HOSTILE}"],
        "quota": {
            "field": "meta.meta.kind",
            "mode": "proportional",
            "groups": {"clean": {"pool": 52, "quota": 9, "selected": 9}, HOSTILE: {"pool": 1, "selected": 0}},
        },
    }
    return table, summary


class _Collector(HTMLParser):
    """Tags and resource-bearing attributes of a document, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: dict[str, int] = {}
        self.urls: list[str] = []
        self.rows: dict[str, list[int]] = {}
        self._strip: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        values = dict(attrs)
        for name in ("src", "href", "xlink:href", "action", "data", "poster", "srcset"):
            if values.get(name):
                self.urls.append(values[name] or "")
        if values.get("style"):
            self.urls.extend(re.findall(r"url\(([^)]*)\)", values["style"] or ""))
        if tag == "div" and "panel" in (values.get("class") or ""):
            self._strip = values.get("data-strip") or values.get("data-reason")
        if tag == "article" and self._strip is not None:
            self.rows.setdefault(self._strip, []).append(int(values["data-row"] or -1))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def report(run_dir: Path) -> Path:
    return build_report(run_dir, gallery_size=6)


# ---------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------
def test_report_is_one_self_contained_file(report: Path, run_dir: Path):
    assert report == run_dir / "report.html"
    text = report.read_text(encoding="utf-8")
    doc = parse(report)
    assert doc.urls, "the report references its thumbnails"
    for url in doc.urls:
        assert url.startswith(("data:image/", "#")), f"external reference: {url[:80]}"
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.IGNORECASE)
    assert "@import" not in text and "<link" not in text
    assert doc.tags.get("script", 0) == 0
    assert "default-src 'none'" in text  # the CSP forbids every load that slipped through


def test_report_has_plots_galleries_and_summary(report: Path):
    doc = parse(report)
    text = " ".join(" ".join(doc.text).split())
    # a histogram per score (5), raw-agent histograms and Pearson maps of the two-agent scores (2 + 2),
    # the score correlations, the selection funnel and one chart per category field (2)
    assert doc.tags["svg"] == 5 + 2 + 2 + 1 + 1 + 2
    assert doc.tags["img"] >= 30
    for family in SCORES:
        assert f"Highest {family}" in text and f"Lowest {family}" in text
    assert "records" in text and "unique images" in text and "Time per agent" in text
    assert "sc.felzenszwalb" in text and "0.62" in text  # Shapley weight from run.json
    assert "Spearman rank correlation" in html.unescape(report.read_text(encoding="utf-8"))
    # errors by kind with examples, malformed lines
    assert "missing" in text and "lost-image" in text and "at lines 11" in text
    assert "Quotas by meta.meta.kind" in text  # quota table, groups with different fields
    # the thumbnails are real JPEGs
    first = re.search(r'src="data:image/jpeg;base64,([^"]+)"', report.read_text(encoding="utf-8"))
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(first.group(1)))) as im:
        assert im.format == "JPEG" and max(im.size) <= 160


def test_galleries_rank_unique_images_and_samples_correctly(report: Path, run_dir: Path):
    rows = pq.read_table(run_dir / "scores.parquet").to_pylist()
    ok = [r for r in rows if r["error_kind"] is None]
    first_of_image: dict[str, dict] = {}
    for r in ok:
        if r["image_key"] is not None and r["sc"] is not None:
            first_of_image.setdefault(r["image_key"], r)
    by_image = list(first_of_image.values())
    strips = _strips(report)
    # sc is image-level: each image once (its first row), highest first, ties by row
    assert strips["sc"]["top"] == [r["row"] for r in sorted(by_image, key=lambda r: (-r["sc"], r["row"]))][:6]
    assert (
        strips["sc"]["bottom"] == [r["row"] for r in sorted(by_image, key=lambda r: (r["sc"], r["row"]))][:6]
    )
    key = {r["row"]: r["image_key"] for r in rows}
    assert len({key[r] for r in strips["oa"]["random"]}) == len(strips["oa"]["random"]) == 6
    # im is sample-level: every error-free sample competes, images may repeat
    with_im = [r for r in ok if r["im"] is not None]
    assert strips["im"]["top"] == [r["row"] for r in sorted(with_im, key=lambda r: (-r["im"], r["row"]))][:6]
    # dropped galleries show rows with that reason only
    reason = {r["row"]: r["reason"] for r in pq.read_table(run_dir / "selection.parquet").to_pylist()}
    shown = parse(report).rows
    for name in ("image_below_cut", "im_nonpositive", "budget"):
        assert shown[name] and all(reason[r] == name for r in shown[name])


def _strips(report: Path) -> dict[str, dict[str, list[int]]]:
    text = report.read_text(encoding="utf-8")
    out: dict[str, dict[str, list[int]]] = {}
    for card in re.finditer(r'<div class="card" id="gallery-\d+">\s*<h3>(\w+) ', text):
        family = {"SC": "sc", "OA": "oa", "DP": "dp", "PT": "pt", "IM": "im"}.get(
            card.group(1), card.group(1)
        )
        end = text.find('<div class="card"', card.end())
        block = text[card.end() : end if end > 0 else None]
        out[family] = {}
        for strip in re.finditer(
            r'data-strip="(\w+)"><div class="gallery">(.*?)</div></div>\s*(?=<div class="panel"|</div>)',
            block,
            re.DOTALL,
        ):
            out[family][strip.group(1)] = [int(r) for r in re.findall(r'data-row="(\d+)"', strip.group(2))]
    return out


def test_hostile_text_is_escaped_everywhere(report: Path):
    text = report.read_text(encoding="utf-8")
    assert HOSTILE not in text
    assert "onerror=alert" not in text.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown, as text
    doc = parse(report)
    assert doc.tags.get("script", 0) == 0
    assert not any(u == "x" for u in doc.urls)
    assert HOSTILE in " ".join(doc.text)  # the reader sees the record's text verbatim


def test_breakdown_uses_small_categorical_fields_only(report: Path):
    text = report.read_text(encoding="utf-8")
    assert 'By <span class="mono">meta.meta.kind</span>' in text
    assert "meta.uid" not in text  # one value per row: an id, not a category


def test_report_is_deterministic(report: Path, run_dir: Path, tmp_path: Path):
    again = build_report(run_dir, out=tmp_path / "again.html", gallery_size=6)
    assert again.read_bytes() == report.read_bytes()
    other_seed = build_report(run_dir, out=tmp_path / "seed.html", gallery_size=6, seed=1)
    assert _strips(other_seed)["pt"]["random"] != _strips(report)["pt"]["random"]
    assert _strips(other_seed)["pt"]["top"] == _strips(report)["pt"]["top"]


def test_report_without_selection_input_or_images(tmp_path: Path):
    run = make_run(tmp_path / "run", with_selection=False)
    (run / "data.jsonl").rename(run / "moved.jsonl")
    path = build_report(run, gallery_size=3)
    text = path.read_text(encoding="utf-8")
    assert 'id="selection"' not in text and "Dropped samples" not in text
    assert "the input cannot be read" in text
    assert "<img" not in text and "input not readable" in text
    assert "Highest sc" in text  # galleries still show the scores

    # a stale selection (other rows) is ignored with a note, not misaligned
    make_run(tmp_path / "other", with_selection=True)
    table = pq.read_table(tmp_path / "other" / "selection.parquet").slice(0, 10)
    pq.write_table(table, run / "selection.parquet")
    text = build_report(run, gallery_size=0).read_text(encoding="utf-8")
    assert "selection.parquet ignored" in text and 'id="selection"' not in text
    assert "<article" not in text  # gallery_size=0: no galleries at all


def test_changed_input_is_not_shown_as_the_wrong_sample(tmp_path: Path):
    run = make_run(tmp_path / "run")
    lines = (run / "data.jsonl").read_text(encoding="utf-8").splitlines()
    lines[0], lines[1] = lines[1], lines[0]  # two records swap places
    (run / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = build_report(run, gallery_size=80).read_text(encoding="utf-8")
    assert "the input changed since the run" in text
    assert "no longer this sample" in text


def test_bad_run_folders_give_clear_errors(tmp_path: Path):
    with pytest.raises(ReportError, match="not found"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no scores.parquet"):
        build_report(tmp_path / "empty")
    run = make_run(tmp_path / "run", with_selection=False)
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    with pytest.raises(ReportError, match="cannot write the report"):
        build_report(run, out=tmp_path / "a-file" / "report.html", gallery_size=0)
    (run / "run.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ReportError, match="run.json is not readable JSON"):
        build_report(run)
    (run / "run.json").write_text("{}", encoding="utf-8")
    (run / "scores.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ReportError, match="not a readable Parquet file"):
        build_report(run)
    with pytest.raises(ReportError, match="gallery_size"):
        build_report(run, gallery_size=-1)


def test_minimal_run_json_still_reports(tmp_path: Path):
    """A score table with no run.json sections (older or partial runs) still gives a full page."""
    run = make_run(tmp_path / "run", n_agents_sc=1, with_selection=False)
    (run / "run.json").write_text(json.dumps({"input": {"path": str(run / "data.jsonl")}}), encoding="utf-8")
    text = build_report(run, gallery_size=2).read_text(encoding="utf-8")
    assert "Highest sc" in text and "computed from the score table" in text  # im: Pearson computed here
    assert "run.json records no agent timings" in text


# ---------------------------------------------------------------------------------------------
# End to end on the bundled examples, when scoring works
# ---------------------------------------------------------------------------------------------
def test_end_to_end_on_the_examples(tmp_path: Path):
    """Score the bundled examples with two cheap real agents, select, and report."""
    from visa.recipe import load_recipe
    from visa.scoring import score
    from visa.selection import SelectionOptions, select

    recipe = tmp_path / "cheap.yaml"
    recipe.write_text(
        "name: cheap\n"
        "scores:\n"
        "  image: {agents: [{name: stats, type: image_stats}]}\n"
        "  sc: {agents: [{name: felzenszwalb, type: felzenszwalb, params: {working_side: 128}}]}\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    score(load_recipe(str(recipe)), EXAMPLES / "llava.json", run)
    select(run, SelectionOptions(budget=20, image_keep=0.6), write_records=False)
    path = build_report(run, gallery_size=4)
    text = path.read_text(encoding="utf-8")
    assert "Image statistics" in text and "SC · segmentation complexity" in text
    assert 'id="selection"' in text and "20 samples selected" in text
    assert text.count("<img ") >= 8  # top, bottom and random photos of the examples
    assert "Describe this portrait." in text or "<b>Q</b>" in text


# ---------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------
needs_browser = pytest.mark.skipif(browser.missing_reason() is not None, reason=str(browser.missing_reason()))

PAGE_FACTS = {
    "svg": "document.querySelectorAll('svg').length",
    "img": "document.querySelectorAll('img').length",
    "img_broken": "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length",
    "scripts": "document.querySelectorAll('script').length",
    "overflow_x": "document.documentElement.scrollWidth - window.innerWidth",
    "height": "document.documentElement.scrollHeight",
    "toc_sticky": "getComputedStyle(document.querySelector('nav.toc')).position",
    "visible_cards": "[...document.querySelectorAll('#galleries article')].filter(a => a.offsetParent).length",
    "title": "document.title",
}


@pytest.fixture(scope="module")
def page(report: Path, tmp_path_factory: pytest.TempPathFactory) -> browser.PageReport:
    shots = tmp_path_factory.mktemp("shots")
    return browser.open_page(report, evaluate=PAGE_FACTS, screenshots={shots / "top.png": (0, 4000)})


@needs_browser
def test_browser_shows_the_report_without_errors_or_network(page: browser.PageReport):
    assert page.errors == []
    assert page.network == []
    assert page.failed == []
    assert page.values["scripts"] == 0


@needs_browser
def test_browser_renders_plots_and_thumbnails(page: browser.PageReport, report: Path):
    assert page.values["svg"] == parse(report).tags["svg"] >= 13
    assert page.values["img"] >= 30 and page.values["img_broken"] == 0
    assert page.values["overflow_x"] <= 0, "the page scrolls sideways at 1280 px"
    assert page.values["toc_sticky"] == "sticky"
    # per score gallery only one strip (top) is visible at a time
    assert 0 < page.values["visible_cards"] <= 5 * 6
    assert page.values["title"].startswith("visa report")
    from PIL import Image

    with Image.open(page.screenshots[0]) as shot:
        assert shot.size == (1280, 4000)
        colours = shot.convert("RGB").resize((64, 200)).getcolors(64 * 200)
        assert colours is not None and len(colours) > 50  # not a blank page


@needs_browser
def test_browser_check_detects_network_loads(tmp_path: Path):
    """The network check can fail: a page with a remote image is caught."""
    page_path = tmp_path / "remote.html"
    page_path.write_text(
        '<!doctype html><img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script>',
        encoding="utf-8",
    )
    seen = browser.open_page(page_path, height=600)
    assert any(u.startswith("http://127.0.0.1:9/") for u in seen.network)
    assert any("boom" in e for e in seen.errors)


def test_float_columns_without_nulls_are_read_into_writable_arrays():
    """Arrow hands out read-only zero-copy views of null-free columns; the report must not write to them."""
    from visa.report.data import _floats

    values = _floats(pa.chunked_array([pa.array([1.0, float("inf"), 3.0])]))
    assert np.isnan(values[1]) and values[0] == 1.0 and values[2] == 3.0
