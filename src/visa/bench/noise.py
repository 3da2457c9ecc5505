"""`visa bench noise`: do the scores and the selection reject known, injected noise?

From a clean LLaVA-style set the pool builder writes a labelled noisy pool (a new LLaVA JSON plus
its images): every clean sample on its own image, and a fraction of

* ``misaligned``: a clean conversation moved onto another photo;
* degraded images, conversation kept: ``blank`` (one solid colour), ``blur`` (Gaussian, radius 1/20
  of the long side), ``thumbnail`` (32 px on the long side, upscaled back), ``noise`` (uniform random
  pixels), ``jpeg`` (JPEG quality 2);
* ``text_only``: questions answerable without the image (arithmetic, general knowledge; a small
  bundled list) attached to real photos.

The pool is scored with a recipe and selected from; every signal (fused scores, agent columns, the
selection, and the baselines: random subsets, raw image-text similarity) is then rated by

* AUROC of separating clean from noisy = P(clean scores higher than noisy) + 1/2 P(tie), per noise
  kind and overall. A sample a signal could not rate (null) counts as the least clean;
* precision at the budget: the fraction of clean samples among the budget's top samples (ties at
  the boundary taken fractionally, i.e. the expectation under random tie-breaking); for the selection
  itself, among the selected samples; and the noise rate of that subset (1 - precision) against the
  pool's.

Sign convention: each family's ``direction`` in :mod:`visa.families`: higher = cleaner for sc, oa,
dp, im and every other column, except pt, where a higher perplexity means noisier text, so pt
columns are negated before rating. Descriptive families (image statistics) are not rated.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visa import families as fam

DEGRADATIONS = ("blank", "blur", "thumbnail", "noise", "jpeg")
NOISE_KINDS = ("misaligned", *DEGRADATIONS, "text_only")
SIMILARITY_COLUMN = "im.similarity.similarity"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# Questions a text model answers without looking at the picture.
TEXT_ONLY_QA: tuple[tuple[str, str], ...] = (
    ("What is 17 + 25?", "17 + 25 = 42."),
    ("What is 9 times 8?", "9 times 8 is 72."),
    ("What is 144 divided by 12?", "144 divided by 12 is 12."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What is 15% of 200?", "15% of 200 is 30."),
    ("Solve for x: 3x + 4 = 19.", "Subtract 4 from both sides to get 3x = 15, so x = 5."),
    ("What is 2 to the power of 10?", "2 to the power of 10 is 1024."),
    ("How many minutes are there in three hours?", "Three hours have 180 minutes."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    (
        "At what temperature does water boil at sea level in Celsius?",
        "Water boils at 100 degrees Celsius at sea level.",
    ),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    (
        "What gas do plants absorb from the air for photosynthesis?",
        "Plants absorb carbon dioxide for photosynthesis.",
    ),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("What is the plural of 'mouse'?", "The plural of 'mouse' is 'mice'."),
    ("Name the three primary colours of light.", "The primary colours of light are red, green and blue."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("Write a Python expression for the length of a list xs.", "len(xs)"),
)


class BenchError(ValueError):
    """Bad benchmark input or options: one line for the user."""


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def auroc(clean: np.ndarray, noisy: np.ndarray) -> float:
    """P(a clean value > a noisy value) + 1/2 P(tie), over all pairs; NaN when a side is empty.

    Computed from mid-ranks (Mann-Whitney U), so it is exact with ties and O(n log n).
    """
    clean = np.asarray(clean, dtype=np.float64)
    noisy = np.asarray(noisy, dtype=np.float64)
    if not clean.size or not noisy.size:
        return float("nan")
    values = np.concatenate([clean, noisy])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_values = values[order]
    # mid-ranks of tied runs
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e - 1) / 2.0 + 1.0
    u = ranks[: clean.size].sum() - clean.size * (clean.size + 1) / 2.0
    return float(u / (clean.size * noisy.size))


def budget_count(budget: int | str | None, pool: int) -> int:
    """Samples the budget keeps in a pool of ``pool``: the selection's budget rule
    (:func:`visa.selection.options.parse_budget`: a count, or 'p%' rounded half up), at least 1."""
    from visa.selection.options import budget_rows, parse_budget

    try:
        parsed = parse_budget(budget)
    except ValueError:
        raise BenchError(f"budget must be a count or a percentage like '50%', not {budget!r}") from None
    rows = budget_rows(parsed, pool)
    if rows is None:
        return pool
    if parsed in (0, "0%"):
        raise BenchError(f"budget must be at least 1 sample, not {budget!r}")
    return max(1, min(pool, rows))


def precision_at(values: np.ndarray, clean: np.ndarray, k: int) -> float:
    """Expected fraction of clean samples among the ``k`` highest values (random tie-breaking)."""
    values = np.asarray(values, dtype=np.float64)
    clean = np.asarray(clean, dtype=bool)
    if k <= 0 or not values.size:
        return float("nan")
    k = min(k, values.size)
    threshold = np.sort(values)[::-1][k - 1]
    above = values > threshold
    tied = values == threshold
    need = k - int(above.sum())
    return float((clean[above].sum() + need * clean[tied].mean()) / k)


def rated(values: Sequence[Any] | np.ndarray, flip: bool = False) -> np.ndarray:
    """Values as float64 with the benchmark's direction (higher = cleaner); null/NaN -> -inf."""
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if flip:
        array = -array
    array[np.isnan(array)] = -np.inf
    return array


@dataclass
class SignalRow:
    signal: str
    direction: str
    auroc: dict[str, float]
    precision: float
    selected: int
    missing: int = 0
    spread: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = {
            "signal": self.signal,
            "direction": self.direction,
            "auroc": {k: _round(v) for k, v in self.auroc.items()},
            "precision": _round(self.precision),
            "noise_rate_selected": _round(1.0 - self.precision),
            "selected": self.selected,
            "missing": self.missing,
        }
        if self.spread:
            out["spread"] = {k: _round(v) for k, v in self.spread.items()}
        if self.note:
            out["note"] = self.note
        return out


def _round(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 3)


def rate_signal(
    name: str, values: np.ndarray, kinds: np.ndarray, k: int, direction: str, missing: int = 0
) -> SignalRow:
    """AUROC per noise kind present + overall, and precision at ``k``, of one signal (higher = cleaner)."""
    clean = kinds == "clean"
    per_kind = {
        kind: auroc(values[clean], values[kinds == kind]) for kind in NOISE_KINDS if (kinds == kind).any()
    }
    per_kind["all"] = auroc(values[clean], values[~clean])
    return SignalRow(name, direction, per_kind, precision_at(values, clean, k), k, missing)


def rate_selection(selected: np.ndarray, kinds: np.ndarray) -> SignalRow:
    selected = np.asarray(selected, dtype=bool)
    row = rate_signal("selection", selected.astype(np.float64), kinds, int(selected.sum()), "selected = 1")
    row.precision = float((kinds[selected] == "clean").mean()) if selected.any() else float("nan")
    return row


def random_baseline(kinds: np.ndarray, k: int, draws: int = 1000, seed: int = 0) -> SignalRow:
    """Random scores / random subsets of size ``k``: mean and standard deviation over ``draws`` seeds."""
    rng = np.random.default_rng(seed)
    clean = kinds == "clean"
    names = [kind for kind in NOISE_KINDS if (kinds == kind).any()] + ["all"]
    aurocs: dict[str, list[float]] = {n: [] for n in names}
    precisions = []
    for _ in range(draws):
        values = rng.random(kinds.size)
        for n in names:
            noisy = ~clean if n == "all" else kinds == n
            aurocs[n].append(auroc(values[clean], values[noisy]))
        precisions.append(precision_at(values, clean, k))
    row = SignalRow(
        "random",
        f"mean of {draws} draws",
        {n: float(np.mean(v)) for n, v in aurocs.items()},
        float(np.mean(precisions)),
        k,
    )
    row.spread = {**{n: float(np.std(v)) for n, v in aurocs.items()}, "precision": float(np.std(precisions))}
    return row


# ---------------------------------------------------------------------------------------------
# Pool builder
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolOptions:
    seed: int = 0
    misaligned: float = 0.25  # per clean sample
    degraded: float = 0.08  # per clean sample, for each degradation
    text_only: float = 0.15  # per clean sample
    kinds: tuple[str, ...] = NOISE_KINDS
    max_clean: int | None = None

    def count(self, kind: str, clean: int) -> int:
        if kind not in self.kinds:
            return 0
        share = (
            self.misaligned
            if kind == "misaligned"
            else self.text_only
            if kind == "text_only"
            else self.degraded
        )
        return 0 if share <= 0 else max(1, math.floor(share * clean + 0.5))


def read_records(data: Path) -> list[dict[str, Any]]:
    """The well-formed records of any input `visa score` reads, through the same tolerant readers:
    a malformed record is skipped (as it would be an error row when scoring), not a failure."""
    from visa.readers import InputError, open_input

    try:
        return [raw.record for raw in open_input(Path(data)).iter_raw() if raw.record is not None]
    except InputError as err:
        raise BenchError(str(err)) from None


def _first_image(record: Mapping[str, Any]) -> str | None:
    image = record.get("image", record.get("images"))
    if isinstance(image, list):
        image = image[0] if image else None
    return image if isinstance(image, str) and image else None


def clean_records(records: list[dict[str, Any]], root: Path) -> list[tuple[dict[str, Any], Path]]:
    """Records usable as clean samples: meta.kind 'clean' when present, an image that exists, a conversation."""
    out = []
    for record in records:
        meta = record.get("meta")
        if isinstance(meta, Mapping) and "kind" in meta and meta["kind"] != "clean":
            continue
        image = _first_image(record)
        conversations = record.get("conversations")
        if image is None or not isinstance(conversations, list) or not conversations:
            continue
        path = (root / image).resolve()
        if path.is_file():
            out.append((record, path))
    return out


def degrade(image: Any, kind: str, rng: random.Random) -> Any:
    """A degraded copy of an RGB PIL image (same size)."""
    from PIL import Image, ImageFilter

    width, height = image.size
    if kind == "blank":
        colour = tuple(rng.randrange(256) for _ in range(3))
        return Image.new("RGB", (width, height), colour)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 20.0))
    if kind == "thumbnail":
        small = image.copy()
        small.thumbnail((32, 32), Image.Resampling.BILINEAR)
        return small.resize((width, height), Image.Resampling.BILINEAR)
    if kind == "noise":
        pixels = np.random.default_rng(rng.randrange(2**32)).integers(
            0, 256, (height, width, 3), dtype=np.uint8
        )
        return Image.fromarray(pixels, "RGB")
    if kind == "jpeg":
        return image  # the damage is done when it is saved with quality 2
    raise BenchError(f"unknown degradation {kind!r}; choose from {', '.join(DEGRADATIONS)}")


def _conversation_with_image(conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    turns = [dict(t) for t in conversations]
    if not any("<image>" in str(t.get("value", "")) for t in turns) and turns:
        turns[0]["value"] = "<image>\n" + str(turns[0].get("value", ""))
    return turns


def build_pool(
    data: Path, out_dir: Path, options: PoolOptions | None = None, image_root: Path | None = None
) -> Path:
    """Write ``out_dir/pool.json`` (+ ``out_dir/images``): clean samples and labelled noise.

    Every record's ``meta`` holds ``noise`` (``clean`` or a noise kind) and ``source`` (the clean
    record it came from). Returns the pool's path.
    """
    options = options or PoolOptions()
    unknown = sorted(set(options.kinds) - set(NOISE_KINDS))
    if unknown:
        raise BenchError(f"unknown noise kind(s) {', '.join(unknown)}; choose from {', '.join(NOISE_KINDS)}")
    data = Path(data)
    clean, photos = _clean_pool(data, Path(image_root) if image_root else data.parent, options)
    rng = random.Random(options.seed)
    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    names: dict[Path, str] = {}
    for i, path in enumerate(photos):
        name = path.name if path.name not in names.values() else f"{i}-{path.name}"
        names[path] = name
        shutil.copyfile(path, images_dir / name)

    pool: list[dict[str, Any]] = []

    def add(kind: str, source: dict[str, Any], image: str, conversations: list[dict[str, Any]]) -> None:
        sid = str(source.get("id", len(pool)))
        pool.append(
            {
                "id": f"{kind}-{len(pool):05d}-{sid}",
                "image": f"images/{image}",
                "conversations": _conversation_with_image(conversations),
                "meta": {"noise": kind, "source": sid},
            }
        )

    for record, path in clean:
        add("clean", record, names[path], record["conversations"])
    n = len(clean)
    for kind in options.kinds:
        count = options.count(kind, n)
        if kind == "misaligned":
            for record, path in (clean[i] for i in rng.sample(range(n), min(count, n))):
                other = rng.choice([p for p in photos if p != path])
                add(kind, record, names[other], record["conversations"])
        elif kind == "text_only":
            for j in range(count):
                question, answer = TEXT_ONLY_QA[(j + rng.randrange(len(TEXT_ONLY_QA))) % len(TEXT_ONLY_QA)]
                photo = rng.choice(photos)
                add(
                    kind,
                    {"id": f"qa{j}"},
                    names[photo],
                    [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
                )
        else:
            for j, (record, path) in enumerate(clean[i] for i in rng.sample(range(n), min(count, n))):
                add(kind, record, _degraded_copy(path, kind, j, images_dir, rng), record["conversations"])
    out = Path(out_dir) / "pool.json"
    out.write_text(json.dumps(pool, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _clean_pool(data: Path, root: Path, options: PoolOptions) -> tuple[list[tuple[dict[str, Any], Path]], list[Path]]:
    """The clean records with a readable image (at most ``max_clean``) and their distinct photos."""
    clean = clean_records(read_records(data), root)
    if options.max_clean is not None:
        clean = clean[: options.max_clean]
    photos = sorted({path for _, path in clean})
    if len(clean) < 2 or (len(photos) < 2 and "misaligned" in options.kinds):
        raise BenchError(
            f"{data} has {len(clean)} clean records with images on {len(photos)} photos: need 2 or more"
        )
    return clean, photos


def _degraded_copy(path: Path, kind: str, j: int, images_dir: Path, rng: random.Random) -> str:
    """Write the photo at ``path`` damaged by ``kind`` into ``images_dir``; returns the file's name."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    damaged = degrade(rgb, kind, rng)
    if kind == "jpeg":
        name = f"{kind}-{j:04d}-{path.stem}.jpg"
        damaged.save(images_dir / name, format="JPEG", quality=2)
    else:
        name = f"{kind}-{j:04d}-{path.stem}.png"
        damaged.save(images_dir / name, format="PNG")
    return name


# ---------------------------------------------------------------------------------------------
# Evaluation of a scored (and selected) pool
# ---------------------------------------------------------------------------------------------
def signal_columns(table: Any, run: Mapping[str, Any] | None = None) -> list[str]:
    """Fused score columns, then every agent's primary score column, in table order."""
    names = table.column_names
    numeric = {f.name for f in table.schema if _is_number(f.type)}
    fused = [c for c in fam.SCORE_FAMILIES if c in numeric]
    agents: list[str] = []
    for agent in (run or {}).get("agents") or []:
        column = agent.get("column") if isinstance(agent, Mapping) else None
        if isinstance(column, str) and column in numeric and fam.is_score(str(agent.get("score"))):
            agents.append(column)
    if not agents:
        agents = [
            c for c in names
            if c in numeric and (parts := fam.split_agent_column(c)) and parts[0] in fam.SCORE_FAMILIES
        ]
    return fused + [c for c in agents if c not in fused]


def _is_number(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(kind) or pa.types.is_integer(kind)


def _direction(column: str) -> tuple[bool, str]:
    flip = fam.spec(column.split(".")[0]).direction < 0
    return flip, ("lower = cleaner (negated)" if flip else "higher = cleaner")


def pool_kinds(table: Any, pool: list[dict[str, Any]]) -> np.ndarray:
    """The noise label of every table row (rows are positions in the pool)."""
    labels = np.array([r.get("meta", {}).get("noise", "clean") for r in pool], dtype=object)
    rows = (
        np.asarray(table.column("row").to_numpy(), dtype=np.int64)
        if "row" in table.column_names
        else np.arange(table.num_rows)
    )
    return labels[rows]


def similarity_values(table: Any, pool: list[dict[str, Any]]) -> tuple[np.ndarray | None, str]:
    """Raw image-text cosine per row: the run's ``im.similarity.similarity`` when present, else the
    text-image similarity agent computed from the run's visual evidence columns (None without them)."""
    if SIMILARITY_COLUMN in table.column_names:
        return rated(table.column(SIMILARITY_COLUMN).to_pylist()), f"column {SIMILARITY_COLUMN}"
    from visa.agents.base import SampleItem
    from visa.agents.text_image_similarity import TextImageSimilarityAgent

    agent = TextImageSimilarityAgent()
    present = [c for c in agent.needs if c in table.column_names]
    if not any(c.startswith("oa.") for c in present):
        return None, "not available: the recipe has no tagger (oa) evidence"
    agent.setup()
    context = {c: table.column(c).to_pylist() for c in present}
    rows = np.asarray(table.column("row").to_numpy(), dtype=np.int64)
    items = [
        SampleItem(
            str(i),
            str(i),
            conversation_turns(pool[r]["conversations"]),
            image_keys=(str(pool[r].get("image", "")),) if pool[r].get("image") else (),
            context={c: context[c][i] for c in present},
        )
        for i, r in enumerate(rows)
    ]
    results = agent.score_batch(items)
    agent.teardown()
    return rated(
        [None if isinstance(r, Exception) else r.get("similarity") for r in results]
    ), "computed with the text-image similarity agent"


def conversation_turns(conversations: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    """LLaVA ``conversations`` as :class:`visa.samples.Turn` objects."""
    from visa.samples import Turn

    roles = {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "system": "system",
    }
    return tuple(Turn(roles.get(str(t.get("from")), "user"), str(t.get("value", ""))) for t in conversations)


def evaluate(
    run_dir: Path,
    pool_path: Path,
    selected: np.ndarray | None,
    budget: int | str | None,
    seed: int = 0,
    draws: int = 1000,
) -> dict[str, Any]:
    """Rate every signal of a scored pool; returns the report (also the JSON written by the command)."""
    import pyarrow.parquet as pq

    from visa.run_folder import RunFolder
    from visa.selection import read_run

    run = read_run(run_dir).to_json()
    table = pq.read_table(RunFolder(run_dir).scores)
    pool = read_records(pool_path)
    kinds = pool_kinds(table, pool)
    k = budget_count(budget, table.num_rows)
    rows: list[SignalRow] = []
    for column in signal_columns(table, run):
        flip, direction = _direction(column)
        raw = table.column(column).to_pylist()
        missing = sum(1 for v in raw if v is None or (isinstance(v, float) and math.isnan(v)))
        rows.append(rate_signal(column, rated(raw, flip), kinds, k, direction, missing))
    if selected is not None:
        rows.append(rate_selection(selected, kinds))
    rows.append(random_baseline(kinds, k, draws=draws, seed=seed))
    similarity, source = similarity_values(table, pool)
    if similarity is not None:
        row = rate_signal(
            "baseline: image-text similarity",
            similarity,
            kinds,
            k,
            "higher = cleaner",
            int(np.isinf(similarity).sum()),
        )
        row.note = source
        rows.append(row)
    counts = {kind: int((kinds == kind).sum()) for kind in ("clean", *NOISE_KINDS) if (kinds == kind).any()}
    return {
        "pool": {
            "path": str(pool_path),
            "samples": int(kinds.size),
            "counts": counts,
            "noise_rate": _round(float((kinds != "clean").mean())),
        },
        "budget": {"value": budget, "samples": k},
        "similarity_baseline": source,
        "convention": "AUROC = P(clean scores higher than noisy) + 1/2 P(tie); higher = cleaner for every "
        "column except pt (higher perplexity = noisier, negated); a null score counts as least "
        "clean; precision = clean fraction of the top `budget` samples (selection: of the "
        "selected samples); noise rate = 1 - precision",
        "signals": [r.as_dict() for r in rows],
    }


def selection_breakdown(
    pool: list[dict[str, Any]], rows: Sequence[int], selected: Sequence[bool], reasons: Sequence[str | None]
) -> dict[str, dict[str, Any]]:
    """Per noise kind: pool count, kept count and share, and how many each selection rule dropped."""
    out: dict[str, dict[str, Any]] = {}
    for row, kept, reason in zip(rows, selected, reasons, strict=True):
        kind = pool[row].get("meta", {}).get("noise", "clean")
        entry = out.setdefault(kind, {"pool": 0, "kept": 0, "dropped": {}})
        entry["pool"] += 1
        if kept:
            entry["kept"] += 1
        else:
            key = reason or "unknown"
            entry["dropped"][key] = entry["dropped"].get(key, 0) + 1
    order = ["clean", *NOISE_KINDS]
    result = {k: out[k] for k in sorted(out, key=lambda k: order.index(k) if k in order else len(order))}
    for entry in result.values():
        entry["kept_share"] = _round(entry["kept"] / entry["pool"])
    return result


def breakdown_markdown(breakdown: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| kind | pool | kept | kept share | dropped by |", "|---|---:|---:|---:|---|"]
    for kind, e in breakdown.items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(e["dropped"].items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"| {kind} | {e['pool']} | {e['kept']} | {e['kept_share']:.2f} | {dropped} |")
    return "\n".join(lines) + "\n"


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table (one row per signal)."""
    kinds = [k for k in NOISE_KINDS if k in report["pool"]["counts"]] + ["all"]
    header = [
        "signal",
        "direction",
        *[f"AUROC {k}" for k in kinds],
        "precision@budget",
        "noise rate (selected)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in report["signals"]:
        spread = s.get("spread", {})

        def cell(name: str, value: float | None, spread: dict[str, float] = spread) -> str:
            if value is None:
                return "n/a"
            return f"{value:.3f} ± {spread[name]:.3f}" if name in spread else f"{value:.3f}"

        name = s["signal"] + (f" ({s['missing']} null)" if s.get("missing") else "")
        precision = cell("precision", s["precision"])
        noise = (
            "n/a"
            if s["noise_rate_selected"] is None
            else f"{s['noise_rate_selected']:.3f} ({s['selected']} kept)"
        )
        lines.append(
            "| "
            + " | ".join(
                [name, s["direction"], *[cell(k, s["auroc"].get(k)) for k in kinds], precision, noise]
            )
            + " |"
        )
    pool = report["pool"]
    counts = ", ".join(f"{k} {v}" for k, v in pool["counts"].items())
    lines.append("")
    lines.append(
        f"Pool: {pool['samples']} samples ({counts}); pool noise rate {pool['noise_rate']:.3f}; "
        f"budget {report['budget']['value']} = {report['budget']['samples']} samples."
    )
    lines.append(report["convention"] + ".")
    return "\n".join(lines) + "\n"


def rich_table(report: Mapping[str, Any]) -> Any:
    from rich.table import Table

    text = markdown_table(report).splitlines()
    header = [c.strip() for c in text[0].strip("|").split("|")]
    table = Table(
        title=f"noise benchmark: pool noise rate {report['pool']['noise_rate']}, "
        f"budget {report['budget']['samples']} of {report['pool']['samples']}",
        caption=report["convention"],
    )
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right")
    for line in text[2:]:
        if not line.startswith("|"):
            break
        table.add_row(*[c.strip() for c in line.strip("|").split("|")])
    return table


def run_noise(
    recipe: str,
    data: Path,
    out_dir: Path,
    *,
    image_root: Path | None = None,
    seed: int = 0,
    budget: str = "50%",
    pool_options: PoolOptions | None = None,
    workers: int = 1,
    progress: Any = None,
    draws: int = 1000,
) -> dict[str, Any]:
    """Build the pool in ``out_dir/pool``, score it into ``out_dir/run``, select, rate; write
    ``out_dir/noise.json`` and ``out_dir/noise.md``. Returns the report."""
    from visa.recipe import load_recipe
    from visa.run_folder import RunFolder
    from visa.scoring import score
    from visa.selection import resolve_options, select

    out_dir = Path(out_dir)
    budget_count(budget, 100)  # validate early
    loaded = load_recipe(recipe)
    options = pool_options or PoolOptions(seed=seed)
    pool_path = build_pool(data, out_dir / "pool", options, image_root=image_root)
    run_dir = out_dir / "run"
    folder = RunFolder(run_dir)
    record = score(loaded, pool_path, run_dir, workers=workers, progress=progress)
    result = select(run_dir, resolve_options(record, {"budget": budget, "seed": seed}), write_records=False)
    import pyarrow.parquet as pq

    selection = pq.read_table(folder.selection, columns=["row", "selected", "reason"])
    scores_rows = pq.read_table(folder.scores, columns=["row"]).column("row").to_pylist()
    chosen = dict(
        zip(selection.column("row").to_pylist(), selection.column("selected").to_pylist(), strict=True)
    )
    selected = np.array([bool(chosen.get(r, False)) for r in scores_rows])
    report = evaluate(run_dir, pool_path, selected, budget, seed=seed, draws=draws)
    report["selection_by_kind"] = selection_breakdown(
        read_records(pool_path),
        selection.column("row").to_pylist(),
        selection.column("selected").to_pylist(),
        selection.column("reason").to_pylist(),
    )
    report["recipe"] = loaded.name
    report["input"] = str(data)
    report["seed"] = seed
    report["timings"] = {
        "score_seconds": record["timings"]["total_seconds"],
        "select_seconds": round(result.timings.get("total", 0.0), 3),
    }
    (out_dir / "noise.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "noise.md").write_text(
        markdown_table(report)
        + "\nThe selection, by noise kind:\n\n"
        + breakdown_markdown(report["selection_by_kind"]),
        encoding="utf-8",
    )
    return report
