"""Pools with known task families, for measuring whether a selection keeps every kind of task.

Every sample is an image plus a question and its answer, drawn or taken from freely licensed
material, and labelled with its task family in ``meta.family`` (the selection never reads it unless
told to; the benchmark uses it to measure coverage):

``photo``       real photos of ``examples/`` with their hand-written conversations (scikit-image,
                scikit-learn and matplotlib sample images; see examples/README.md)
``text``        a line of rendered text (signs, notices, short phrases) to read out
``code``        a screenshot of a small Python function: its name, parameters, return value
``chart``       bar, line and pie charts drawn with matplotlib: maxima, values, shares
``digit``       a handwritten digit (scikit-learn's digits set, upscaled)
``arithmetic``  two handwritten digits with a printed operator: the result
``document``    a rendered letter or memo: title, date, sender, amounts
``shapes``      synthetic VQA in the easy-vqa style: one coloured shape on a plain background

Rendered text uses the DejaVu fonts that ship with matplotlib. The contents (phrases, function
bodies, chart data, which digits, document fields, shapes) are drawn with the seed, so several
seeds give several different pools. Noise is then injected by the noise benchmark's own pool builder
(:func:`visa.bench.noise.build_pool`: misaligned conversations, blank / blurred / thumbnail / noise /
JPEG-damaged images, text-only questions), and each noisy sample keeps the family of its source.

Commands (repository root; ``build`` writes a pool, ``visa score`` runs the embedded recipe over it,
``union`` joins scored pools into one larger pool without recomputing their results, ``evaluate``
selects with and without content clusters at several budgets and prints the tables)::

    for s in 0 1 2; do
      PYTHONPATH=src .venv/bin/python benchmarks/task_pools.py build --out runs/task-pools/s$s --seed $s
      OMP_NUM_THREADS=1 .venv/bin/visa score --recipe embedded --data runs/task-pools/s$s/pool/pool.json \\
          --out runs/task-pools/s$s/run
    done
    PYTHONPATH=src .venv/bin/python benchmarks/task_pools.py union --out runs/task-pools/union \\
        runs/task-pools/s0 runs/task-pools/s1 runs/task-pools/s2
    OMP_NUM_THREADS=1 .venv/bin/visa score --recipe embedded --data runs/task-pools/union/pool/pool.json \\
        --out runs/task-pools/union/run
    PYTHONPATH=src .venv/bin/python benchmarks/task_pools.py evaluate runs/task-pools/s0 runs/task-pools/s1 \\
        runs/task-pools/s2 runs/task-pools/union
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from visa.run_folder import RunFolder  # noqa: E402 (src on the path first)
from visa.store import WorkDir  # noqa: E402

FAMILIES = ("photo", "text", "code", "chart", "digit", "arithmetic", "document", "shapes")
NOT_PHOTOS = frozenset({"page.png", "text.png"})  # scanned text among the example photos

Sample = tuple[Image.Image, str, str]  # image, question, answer


# ---------------------------------------------------------------------------------------------
# Fonts and small helpers
# ---------------------------------------------------------------------------------------------
def font(size: int, style: str = "sans") -> ImageFont.FreeTypeFont:
    """A DejaVu font shipped with matplotlib (``sans``, ``serif``, ``mono``, ``bold``)."""
    import matplotlib

    files = {
        "sans": "DejaVuSans.ttf",
        "serif": "DejaVuSerif.ttf",
        "mono": "DejaVuSansMono.ttf",
        "bold": "DejaVuSans-Bold.ttf",
    }
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / files[style]), size)


def _pastel(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(200, 256) for _ in range(3))  # type: ignore[return-value]


def _dark(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(0, 90) for _ in range(3))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------
SIGN_WORDS = (
    ("OPEN", "CLOSED", "EXIT", "ENTRANCE", "PUSH", "PULL", "NO PARKING", "FIRE EXIT", "STAFF ONLY"),
    ("Mind the gap", "Please wait here", "Fresh bread daily", "Keep off the grass", "Wet floor",
     "Back in 10 minutes", "Quiet please", "Library hours 9 to 5", "All visitors must sign in",
     "Bicycle parking", "Tickets sold here", "Platform 4", "Lost and found", "Do not feed the ducks",
     "Cash only", "Welcome to Riverside Park", "Free Wi-Fi inside", "Elevator out of order"),
)
ADJECTIVES = ("silver", "quiet", "golden", "rapid", "hidden", "northern", "bright", "little", "ancient",
              "green", "frozen", "lucky")
NOUNS = ("harbor", "garden", "river", "lantern", "valley", "market", "bridge", "meadow", "tower",
         "orchard", "station", "island")


def text_sample(rng: random.Random) -> Sample:
    kind = rng.random()
    if kind < 0.35:
        phrase = rng.choice(SIGN_WORDS[0])
    elif kind < 0.75:
        phrase = rng.choice(SIGN_WORDS[1])
    else:
        phrase = f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(('Cafe', 'Hotel', 'Bakery', 'Books'))}"
    style = rng.choice(("sans", "serif", "bold"))
    f = font(rng.randrange(28, 56), style)
    left, top, right, bottom = f.getbbox(phrase)
    pad_x, pad_y = rng.randrange(20, 80), rng.randrange(20, 60)
    image = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), _pastel(rng))
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), phrase, font=f, fill=_dark(rng))
    question = rng.choice(("What does the text in the image say?", "Read the text in this image.",
                           "What is written on this sign?"))
    return image, question, f'The text says "{phrase}".'


FUNCTION_NAMES = ("total_price", "scale_values", "count_words", "mean_score", "clip_value", "area_of",
                  "merge_names", "next_even", "square_sum", "apply_discount", "parse_age", "to_celsius")
PARAMS = ("x", "y", "n", "values", "rate", "limit", "items", "factor", "text", "price")


def code_sample(rng: random.Random) -> Sample:
    name = rng.choice(FUNCTION_NAMES)
    n_params = rng.randrange(1, 4)
    params = rng.sample(PARAMS, n_params)
    a, b = rng.randrange(2, 10), rng.randrange(1, 20)
    lines = [f"def {name}({', '.join(params)}):", f'    """Compute {name.replace("_", " ")}."""']
    lines.append(f"    result = {params[0]} * {a}")
    if n_params > 1:
        lines.append(f"    result = result + {params[1]}")
    lines.append(f"    return result + {b}")
    arg0, arg1 = rng.randrange(1, 10), rng.randrange(1, 10)
    dark = rng.random() < 0.5
    background, ink = ((30, 30, 36), (220, 220, 210)) if dark else ((250, 250, 245), (20, 20, 40))
    f = font(rng.randrange(16, 24), "mono")
    width = max(int(f.getlength(line)) for line in lines) + 80
    line_height = int(f.size * 1.45)
    image = Image.new("RGB", (width, line_height * len(lines) + 30), background)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((8, 15 + i * line_height), f"{i + 1:>2}", font=f, fill=(128, 128, 128))
        draw.text((50, 15 + i * line_height), line, font=f, fill=ink)
    question_kind = rng.randrange(3)
    if question_kind == 0:
        return image, "What is the name of the function defined in this code?", f"The function is called {name}."
    if question_kind == 1:
        return image, "How many parameters does this function take?", (
            f"It takes {n_params} parameter{'s' if n_params > 1 else ''}: {', '.join(params)}.")
    call_args = [arg0] + ([arg1] if n_params > 1 else []) + [1] * max(0, n_params - 2)
    value = arg0 * a + (arg1 if n_params > 1 else 0) + b
    call = f"{name}({', '.join(str(v) for v in call_args)})"
    return image, f"What does {call} return?", f"{call} returns {value}."


CATEGORIES = (("apples", "pears", "plums", "cherries", "grapes"),
              ("Oslo", "Lima", "Cairo", "Hanoi", "Quito"),
              ("cats", "dogs", "birds", "fish", "rabbits"))


def chart_sample(rng: random.Random) -> Sample:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = rng.choice(("bar", "line", "pie"))
    fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=100)
    if kind == "bar":
        labels = list(rng.choice(CATEGORIES))[: rng.randrange(3, 6)]
        values = rng.sample(range(5, 95), len(labels))
        ax.bar(labels, values, color=f"C{rng.randrange(10)}")
        ax.set_ylabel(rng.choice(("count", "sales", "votes")))
        ax.set_title(rng.choice(("Survey results", "Weekly sales", "Votes per option")))
        best = labels[int(np.argmax(values))]
        pick = rng.randrange(len(labels))
        qa = [("Which category has the highest bar in the chart?", f"{best} has the highest bar ({max(values)})."),
              (f"What is the value for {labels[pick]}?", f"The value for {labels[pick]} is {values[pick]}.")]
    elif kind == "line":
        start = rng.randrange(2000, 2016)
        years = list(range(start, start + rng.randrange(5, 9)))
        values = [rng.randrange(10, 100) for _ in years]
        ax.plot(years, values, marker="o", color=f"C{rng.randrange(10)}")
        ax.set_xlabel("year")
        ax.set_title(rng.choice(("Visitors per year", "Average rainfall", "Members")))
        low = years[int(np.argmin(values))]
        qa = [("In which year is the value lowest?", f"The lowest value is in {low}."),
              ("What years does the chart cover?", f"It covers {years[0]} to {years[-1]}.")]
    else:
        labels = list(rng.choice(CATEGORIES))[: rng.randrange(3, 5)]
        raw = [rng.randrange(1, 10) for _ in labels]
        shares = [round(100 * r / sum(raw)) for r in raw]
        ax.pie(raw, labels=labels, autopct="%1.0f%%")
        ax.set_title(rng.choice(("Share of responses", "Market share", "Budget split")))
        big = labels[int(np.argmax(raw))]
        qa = [("Which slice of the pie chart is the largest?", f"{big} is the largest slice ({max(shares)}%)."),
              ("How many categories does the pie chart show?", f"It shows {len(labels)} categories.")]
    fig.tight_layout()
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    plt.close(fig)
    question, answer = rng.choice(qa)
    return image, question, answer


_DIGITS: tuple[np.ndarray, np.ndarray] | None = None


def _digits() -> tuple[np.ndarray, np.ndarray]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        data = load_digits()
        _DIGITS = (data.images, data.target)
    return _DIGITS


def _digit_image(rng: random.Random, digit: int | None = None, side: int = 112) -> tuple[Image.Image, int]:
    images, targets = _digits()
    candidates = np.flatnonzero(targets == digit) if digit is not None else np.arange(len(targets))
    i = int(candidates[rng.randrange(len(candidates))])
    pixels = (255 - images[i] / 16.0 * 255).astype(np.uint8)  # dark ink on white paper
    return Image.fromarray(pixels, "L").resize((side, side), Image.Resampling.BICUBIC).convert("RGB"), int(targets[i])


def digit_sample(rng: random.Random) -> Sample:
    image, digit = _digit_image(rng, side=rng.randrange(96, 160))
    question = rng.choice(("Which digit is handwritten in this image?", "What number is written here?"))
    return image, question, f"The handwritten digit is {digit}."


def arithmetic_sample(rng: random.Random) -> Sample:
    op = rng.choice("+-x")
    a, b = rng.randrange(10), rng.randrange(10)
    if op == "-" and b > a:
        a, b = b, a
    side = 96
    left, _ = _digit_image(rng, a, side)
    right, _ = _digit_image(rng, b, side)
    image = Image.new("RGB", (3 * side + 40, side + 20), (255, 255, 255))
    image.paste(left, (10, 10))
    image.paste(right, (2 * side + 30, 10))
    draw = ImageDraw.Draw(image)
    f = font(56)
    symbol = {"+": "+", "-": "\u2212", "x": "\u00d7"}[op]
    w = f.getlength(symbol)
    draw.text((side + 20 + (side - w) / 2, 20), symbol, font=f, fill=(30, 30, 30))
    value = a + b if op == "+" else a - b if op == "-" else a * b
    words = {"+": "plus", "-": "minus", "x": "times"}[op]
    return image, "What is the result of the handwritten calculation?", f"{a} {words} {b} is {value}."


PEOPLE = ("Maria Lopez", "Chen Wei", "Amara Okafor", "John Smith", "Ingrid Berg", "Ravi Patel",
          "Sofia Rossi", "Tom Novak")
TOPICS = ("Office move", "Annual budget", "Library renovation", "Team offsite", "Parking permits",
          "Safety inspection", "New opening hours", "Equipment order")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
FILLER = ("Please review the attached plan before the meeting.", "The committee approved the proposal.",
          "All changes take effect next week.", "Questions can be sent to the front desk.",
          "We thank everyone for their patience.", "The previous schedule is no longer valid.",
          "Further details will follow by email.", "Remember to return your old badge.")


def document_sample(rng: random.Random) -> Sample:
    title = rng.choice(TOPICS)
    sender, recipient = rng.sample(PEOPLE, 2)
    date = f"{rng.randrange(1, 29)} {rng.choice(MONTHS)} {rng.randrange(2015, 2025)}"
    amount = rng.randrange(120, 9800)
    body = rng.sample(FILLER, 3)
    body.insert(1, f"The estimated cost is ${amount}.")
    image = Image.new("RGB", (560, 520), (252, 252, 248))
    draw = ImageDraw.Draw(image)
    draw.text((40, 30), "MEMO", font=font(18, "bold"), fill=(90, 90, 90))
    draw.text((40, 60), title, font=font(30, "bold"), fill=(10, 10, 10))
    small, text_font = font(16), font(17, rng.choice(("sans", "serif")))
    draw.text((40, 110), f"Date: {date}", font=small, fill=(40, 40, 40))
    draw.text((40, 135), f"To: {recipient}", font=small, fill=(40, 40, 40))
    draw.text((40, 160), f"From: {sender}", font=small, fill=(40, 40, 40))
    draw.line((40, 190, 520, 190), fill=(120, 120, 120), width=2)
    for i, sentence in enumerate(body):
        draw.text((40, 210 + 34 * i), sentence, font=text_font, fill=(20, 20, 20))
    draw.text((40, 440), f"Signed, {sender}", font=text_font, fill=(20, 20, 20))
    qa = [("What is the title of this memo?", f"The memo is titled \"{title}\"."),
          ("Who sent this memo?", f"It was sent by {sender}."),
          ("What date is written on the document?", f"The date is {date}."),
          ("What is the estimated cost mentioned in the memo?", f"The estimated cost is ${amount}.")]
    question, answer = rng.choice(qa)
    return image, question, answer


COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 210, 20),
           "black": (15, 15, 15), "gray": (128, 128, 128), "orange": (245, 140, 20), "purple": (130, 40, 170)}


def shapes_sample(rng: random.Random) -> Sample:
    side = rng.choice((64, 96, 128))
    image = Image.new("RGB", (side, side), (255, 255, 255) if rng.random() < 0.6 else _pastel(rng))
    draw = ImageDraw.Draw(image)
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(("circle", "rectangle", "triangle"))
    size = rng.randrange(side // 4, side // 2)
    x, y = rng.randrange(2, side - size - 2), rng.randrange(2, side - size - 2)
    if shape == "circle":
        draw.ellipse((x, y, x + size, y + size), fill=COLOURS[colour])
    elif shape == "rectangle":
        draw.rectangle((x, y, x + size, y + int(size * rng.uniform(0.5, 1.0))), fill=COLOURS[colour])
    else:
        draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
    question_kind = rng.randrange(3)
    if question_kind == 0:
        return image, "What shape is in the image?", f"It is a {shape}."
    if question_kind == 1:
        return image, "What color is the shape?", f"The shape is {colour}."
    other = rng.choice([c for c in COLOURS if c != colour])
    asked = colour if rng.random() < 0.5 else other
    article = "an" if asked[0] in "aeiou" else "a"
    return image, f"Is there {article} {asked} {shape} in the image?", "Yes." if asked == colour else "No."


GENERATORS: dict[str, Callable[[random.Random], Sample]] = {
    "text": text_sample,
    "code": code_sample,
    "chart": chart_sample,
    "digit": digit_sample,
    "arithmetic": arithmetic_sample,
    "document": document_sample,
    "shapes": shapes_sample,
}


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------
def photo_records(count: int, rng: random.Random, images_dir: Path) -> list[dict[str, Any]]:
    """``count`` clean records of ``examples/llava.json`` (real photos), images copied over."""
    import shutil

    examples = json.loads((ROOT / "examples" / "llava.json").read_text(encoding="utf-8"))
    usable = [r for r in examples if isinstance(r.get("image"), str)
              and Path(r["image"]).name not in NOT_PHOTOS and (r.get("meta") or {}).get("kind") == "clean"]
    chosen = sorted(rng.sample(range(len(usable)), min(count, len(usable))))
    out = []
    for i in chosen:
        record = usable[i]
        name = Path(record["image"]).name
        if not (images_dir / name).exists():
            shutil.copyfile(ROOT / "examples" / record["image"], images_dir / name)
        out.append({"id": f"photo-{record['id']}", "image": f"images/{name}",
                    "conversations": record["conversations"], "meta": {"family": "photo"}})
    return out


def build_clean(out_dir: Path, seed: int, per_family: int) -> Path:
    """``out_dir/clean.json`` (+ ``out_dir/images``): ``per_family`` samples of every family."""
    rng = random.Random(seed)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records = photo_records(per_family, rng, images_dir)
    for family, generate in GENERATORS.items():
        for j in range(per_family):
            image, question, answer = generate(rng)
            name = f"{family}-{j:03d}.png"
            image.save(images_dir / name, format="PNG")
            records.append({
                "id": f"{family}-{seed}-{j:03d}",
                "image": f"images/{name}",
                "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                  {"from": "gpt", "value": answer}],
                "meta": {"family": family},
            })
    path = out_dir / "clean.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def build(out_dir: Path, seed: int, per_family: int, misaligned: float, degraded: float,
          text_only: float) -> Path:
    """The clean pool, then the noisy pool ``out_dir/pool/pool.json`` with ``meta.family`` on every
    record (a noisy sample takes its source's family; text-only questions get ``text_only``)."""
    from visa.bench.noise import PoolOptions, build_pool

    clean = build_clean(out_dir, seed, per_family)
    family_of = {r["id"]: r["meta"]["family"] for r in json.loads(clean.read_text(encoding="utf-8"))}
    options = PoolOptions(seed=seed, misaligned=misaligned, degraded=degraded, text_only=text_only)
    pool_path = build_pool(clean, out_dir / "pool", options)
    pool = json.loads(pool_path.read_text(encoding="utf-8"))
    for record in pool:
        meta = record["meta"]
        meta["family"] = family_of.get(meta["source"], "text_only")
    pool_path.write_text(json.dumps(pool, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return pool_path


def union(out_dir: Path, pools: list[Path], run_name: str = "run") -> Path:
    """One pool of several built pools (``out_dir/pool/pool.json``), and a run folder that already
    holds their agents' stored results: results are keyed by image content and sample content, so
    scoring the union computes only what no pool computed (samples whose id repeats across pools),
    then assembles the table over the whole union (fusion, pool-relative scores and clusters anew)."""
    import shutil

    images = out_dir / "pool" / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for pool in pools:
        for record in json.loads((pool / "pool" / "pool.json").read_text(encoding="utf-8")):
            name = f"{pool.name}-{Path(record['image']).name}"
            if not (images / name).exists():
                shutil.copyfile(pool / "pool" / record["image"], images / name)
            records.append({**record, "image": f"images/{name}"})
        for folder in WorkDir(pool / run_name).results_dir.glob("*"):
            target = WorkDir(out_dir / "run").results_dir / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for file in folder.iterdir():
                shutil.copyfile(file, target / (file.name if file.suffix != ".parquet" else f"{pool.name}-{file.name}"))
    path = out_dir / "pool" / "pool.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Evaluation: coverage and noise, with and without content clusters
# ---------------------------------------------------------------------------------------------
def evaluate_run(pool_dir: Path, budgets: list[str], modes: dict[str, dict[str, Any]],
                 run_name: str = "run") -> list[dict[str, Any]]:
    """Select from ``pool_dir/<run_name>`` with every mode at every budget; coverage and noise per selection."""
    from visa.selection import resolve_options, select

    run_dir = pool_dir / run_name
    pool = json.loads((pool_dir / "pool" / "pool.json").read_text(encoding="utf-8"))
    family = np.array([r["meta"]["family"] for r in pool])
    noisy = np.array([r["meta"]["noise"] != "clean" for r in pool])
    clean_families = sorted(set(family[~noisy]))
    run = json.loads(RunFolder(run_dir).run_json.read_text(encoding="utf-8"))
    rows = []
    for budget in budgets:
        for mode, overrides in modes.items():
            options = resolve_options(run, {"budget": budget, **overrides})
            result = select(run_dir, options, write_records=False, update_run=False)
            table = result.table
            chosen = np.zeros(len(pool), dtype=bool)
            chosen[np.asarray(table.column("row"))[np.asarray(table.column("selected"))]] = True
            selected = int(chosen.sum())
            coverage = {}
            for name in clean_families:
                in_pool = (family == name) & ~noisy
                pool_share = in_pool.sum() / (~noisy).sum()
                share = (chosen & in_pool).sum() / max(selected, 1)
                coverage[name] = round(float(share / pool_share), 3)
            rows.append({
                "pool": pool_dir.name, "budget": budget, "mode": mode, "selected": selected,
                "noise_rate": round(float(noisy[chosen].mean()) if selected else float("nan"), 3),
                "coverage": coverage, "min_coverage": min(coverage.values()),
                "clusters": (result.summary.get("clusters") or {}).get("count"),
            })
    return rows


def signal_aurocs(pools: list[Path], run_name: str, columns: list[str]) -> str:
    """AUROC of clean against each degradation kind, per signal column, over the scored pools
    (rated by :func:`visa.bench.noise.evaluate`, the rating `visa bench noise` prints)."""
    import pyarrow.parquet as pq

    from visa.bench.noise import DEGRADATIONS, evaluate, pool_kinds, rate_signal, rated, read_records

    kinds = (*DEGRADATIONS, "misaligned", "text_only")
    lines = ["| pool | signal | " + " | ".join(kinds) + " |", "|" + "---|" * (2 + len(kinds))]
    for pool in pools:
        report = evaluate(pool / run_name, pool / "pool" / "pool.json", None, "25%")
        by_name = {row["signal"]: row for row in report["signals"]}
        table = pq.read_table(RunFolder(pool / run_name).scores)
        for column in columns:
            row = by_name.get(column)
            if row is None and column in table.column_names:  # not a score (cluster_typicality): rated alike
                kinds_of_rows = pool_kinds(table, read_records(pool / "pool" / "pool.json"))
                values = rated(table.column(column).to_pylist())
                row = rate_signal(column, values, kinds_of_rows, 1, "higher = cleaner", 0).as_dict()
            if row is None:
                continue
            cells = [row["auroc"].get(k) for k in kinds]
            lines.append(f"| {pool.name} | {column} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]]) -> str:
    families = list(rows[0]["coverage"]) if rows else []
    head = "| pool | budget | mode | selected | noise rate | min coverage | " + " | ".join(families) + " |"
    lines = [head, "|" + "---|" * (6 + len(families))]
    for r in rows:
        lines.append(
            f"| {r['pool']} | {r['budget']} | {r['mode']} | {r['selected']} | {r['noise_rate']:.3f} | "
            f"{r['min_coverage']:.2f} | " + " | ".join(f"{r['coverage'][f]:.2f}" for f in families) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write a task-family pool with injected noise")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--per-family", type=int, default=20)
    b.add_argument("--misaligned", type=float, default=0.1)
    b.add_argument("--degraded", type=float, default=0.04)
    b.add_argument("--text-only", type=float, default=0.06)
    u = sub.add_parser("union", help="one pool of several scored pools, reusing their stored results")
    u.add_argument("pools", type=Path, nargs="+")
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--run", default="run", help="run folder inside each pool folder whose stored results are reused")
    e = sub.add_parser("evaluate", help="select with and without clusters; coverage and noise")
    e.add_argument("pools", type=Path, nargs="+", help="folders written by build and scored into <folder>/run")
    e.add_argument("--budgets", default="2.5%,10%,25%")
    e.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    e.add_argument("--run", default="run", help="run folder inside each pool folder (default: run)")
    e.add_argument("--set", action="append", default=[], metavar="OPTION=JSON",
                   help="a selection option for every mode, e.g. --set cluster_im_floor=0 (repeatable)")
    a = sub.add_parser("signals", help="AUROC per degradation kind of score columns (visa bench noise's rating)")
    a.add_argument("pools", type=Path, nargs="+")
    a.add_argument("--run", default="run")
    a.add_argument("--columns", default="sc.pixel_correlation,sc.block_grid,sc.detail_scale,sc.jpeg_bits,"
                   "sc.felzenszwalb,sc.ocr_text,sc,oa,dp,cluster_typicality")
    args = parser.parse_args(argv)
    if args.command == "signals":
        print(signal_aurocs(args.pools, args.run, args.columns.split(",")))
        return 0
    if args.command == "union":
        path = union(args.out, args.pools, args.run)
        print(f"{path}: {len(json.loads(path.read_text(encoding='utf-8')))} samples; now score it into {args.out / 'run'}")
        return 0
    if args.command == "build":
        path = build(args.out, args.seed, args.per_family, args.misaligned, args.degraded, args.text_only)
        print(f"{path}: {len(json.loads(path.read_text(encoding='utf-8')))} samples")
        return 0
    rows = []
    extra = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.set)}
    for pool in args.pools:
        import pyarrow.parquet as pq

        names = pq.read_schema(RunFolder(pool / args.run).scores).names
        family = next(c for c in ("meta.family", "meta.meta.family") if c in names)  # the record's meta.family
        modes = {"no clusters": {"clusters": "off", **extra}, "clusters": {"clusters": "auto", **extra},
                 "family labels": {"clusters": family, **extra}}
        rows += evaluate_run(pool, args.budgets.split(","), modes, args.run)
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
