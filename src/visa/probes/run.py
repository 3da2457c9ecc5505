"""Scoring the probes of a run: build them from the pool, score them with the same agents, store them.

After the pool is scored, :func:`run_probes` draws a calibration sample with a fixed seed (unique
images with one image per sample, and single-image samples), builds the ladders of
:mod:`visa.probes.ladder` and scores them with the run's own agents, as two small runs inside the
run folder::

    RUN_DIR/probes/images/*.png          every probe image (PNG, lossless)
    RUN_DIR/probes/image_probes.jsonl    one LLaVA record per image-ladder rung
    RUN_DIR/probes/sample_probes.jsonl   one record per IM/PT rung
    RUN_DIR/probes/image/                the image agents' run over image_probes.jsonl
    RUN_DIR/probes/sample/               the sample agents' run (plus the image agents they read)
    RUN_DIR/probes/probes.parquet        every probe row: target, ladder, kind, tier, chain, scores

The image ladders are scored by the recipe's image-level agents only, the IM/PT ladders by its
sample-level agents and the image agents these read (``needs``). Each part is an ordinary run, so an
interrupted probe run resumes where it stopped; the probe files are rewritten only when their
content changes (deterministic for a given pool, recipe and seed). Source images are shrunk to
``max_side`` first, which bounds the cost per probe.

Cost: ``images`` ladders of nine rungs and ``samples`` ladders of two rungs plus ``others`` (two
more when PT has two or more agents), with ``images = clamp(share x unique images, minimum,
max_images)`` and the same for samples; a pool-dependent agent (e.g. the tagger's TF-IDF) computes
its pool statistics over the probe run's own rows.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from visa.agents.base import Unit
from visa.families import PT
from visa.images import ImageError, ImageSource, decode_image
from visa.probes.ladder import (
    IM_LADDER,
    IMAGE_LADDER,
    PT_LADDER,
    Rung,
    answer_vocabulary,
    degrade,
    flat_image,
    other_indices,
    other_rung,
    replace_answers,
    shuffle_answers,
)
from visa.probes.options import ProbeOptions
from visa.run_folder import ProbeFolder, RunFolder, atomic_write_table
from visa.samples import Turn, normalize
from visa.store import WorkDir, WorkDirMismatch

if TYPE_CHECKING:
    from visa.readers import Input
    from visa.recipe import Recipe

#: Probe targets (the ``target`` column): image ladders, samples placed on other images, garbled text.
VISUAL, PLACEMENT, TEXT = "visual", "placement", "text"


@dataclass
class _Plan:
    """What to write: records per part and the manifest rows (sample id -> probe fields). Probe
    images are written as they are made (see :class:`visa.run_folder.ProbeFolder`), never held all at once."""

    folder: ProbeFolder
    image_records: list[dict[str, Any]] = field(default_factory=list)
    sample_records: list[dict[str, Any]] = field(default_factory=list)
    manifest: list[dict[str, Any]] = field(default_factory=list)

    def add_image(self, name: str, image: Image.Image) -> None:
        _write_if_changed(self.folder.path / self.folder.image(name), _png(image))


def _conversation(turns: Sequence[Turn]) -> list[dict[str, str]]:
    return [{"from": "human" if t.role == "user" else "gpt", "value": t.text} for t in turns]


def _calibration(table: pa.Table, seed: int, options: ProbeOptions) -> tuple[list[int], list[int]]:
    """Rows whose image starts an image ladder, and rows whose sample starts an IM/PT ladder."""
    ok = pc.is_null(table.column("error_kind")).to_numpy(zero_copy_only=False)
    singles = np.array([len(k or ()) == 1 for k in table.column("image_keys").to_pylist()])
    eligible = np.flatnonzero(ok & singles)
    keys = table.column("image_key").to_pylist()
    first: dict[str, int] = {}
    for row in eligible:
        first.setdefault(keys[row], int(row))
    image_rows = np.array(sorted(first.values()), dtype=np.int64)
    n_images = options.count(image_rows.size, options.max_images)
    n_samples = options.count(eligible.size, options.max_samples)
    # prefixes of two seeded permutations: more probes (other options) keep every earlier ladder
    chosen_images = np.random.default_rng([seed, 0]).permutation(image_rows)[:n_images]
    chosen_samples = np.random.default_rng([seed, 1]).permutation(eligible)[:n_samples]
    return sorted(int(r) for r in chosen_images), sorted(int(r) for r in chosen_samples)


def _load_rows(
    inp: Input, table: pa.Table, rows: set[int], source: ImageSource, max_side: int
) -> dict[int, tuple[tuple[Turn, ...], Image.Image, str]]:
    """Turns, decoded (shrunk) image and image key of each wanted row; unreadable rows are left out."""
    positions = {int(r): i for i, r in enumerate(table.column("row").to_pylist())}
    keys = table.column("image_key").to_pylist()
    out: dict[int, tuple[tuple[Turn, ...], Image.Image, str]] = {}
    wanted = {table.column("row")[r].as_py() for r in rows}
    for raw in inp.iter_raw():
        if raw.index not in wanted:
            continue
        try:
            sample = normalize(raw)
            image = decode_image(source.read_bytes(sample.images[0]), source.limits)
        except (ImageError, ValueError, IndexError):
            continue
        if max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        position = positions[raw.index]
        out[position] = (sample.turns, image, keys[position])
    return out


def _add_image_ladders(plan: _Plan, loaded: dict, rows: list[int]) -> None:
    for j, row in enumerate(rows):
        if row not in loaded:
            continue
        turns, image, key = loaded[row]
        for rung in IMAGE_LADDER:
            name = f"image-{j:03d}-{rung.kind}"
            plan.add_image(name, degrade(image, rung.kind, key))
            plan.image_records.append(
                {"id": name, "image": plan.folder.image(name), "conversations": _conversation(turns)}
            )
            plan.manifest.append(_entry(name, VISUAL, j, rung))


def _add_sample_ladders(plan: _Plan, loaded: dict, rows: list[int], with_pt: bool, seed: int, others: int) -> None:
    present = [r for r in rows if r in loaded]
    keys = [loaded[r][2] for r in present]
    vocabulary = answer_vocabulary([loaded[r][0] for r in present])
    plan.add_image("flat", flat_image())
    for j, row in enumerate(present):
        turns, image, _ = loaded[row]
        own = f"sample-{j:03d}"
        plan.add_image(own, image)
        placements: list[tuple[Rung, str, tuple[Turn, ...], str]] = [(IM_LADDER[0], own, turns, PLACEMENT)]
        for i, other in enumerate(other_indices(j, keys, seed, others)):
            placements.append((other_rung(i), f"sample-{other:03d}", turns, PLACEMENT))
        placements.append((IM_LADDER[2], "flat", turns, PLACEMENT))
        if with_pt:
            placements.append((PT_LADDER[1], own, shuffle_answers(turns, seed + j), TEXT))
            placements.append((PT_LADDER[2], own, replace_answers(turns, vocabulary, seed + j), TEXT))
        for rung, image_name, conversation, target in placements:
            name = f"{target}-{j:03d}-{rung.kind}"
            plan.sample_records.append(
                {"id": name, "image": plan.folder.image(image_name), "conversations": _conversation(conversation)}
            )
            plan.manifest.append(_entry(name, target, j, rung))
        if with_pt:  # the text ladder's top rung is the placement ladder's ``own`` row
            plan.manifest.append(_entry(f"{PLACEMENT}-{j:03d}-own", TEXT, j, PT_LADDER[0]))


def _entry(sample_id: str, target: str, ladder: int, rung: Rung) -> dict[str, Any]:
    return {
        "sample_id": sample_id, "target": target, "ladder": ladder,
        "kind": rung.kind, "tier": rung.tier, "chain": rung.chain,
    }


def _write_if_changed(path: Path, data: bytes) -> None:
    """Keep an identical file untouched (its mtime is part of the input fingerprint a resume checks)."""
    if path.is_file() and path.read_bytes() == data:
        return
    from visa.run_folder import atomic_write

    atomic_write(path, data)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()


def pt_probed(recipe: Recipe) -> bool:
    """Whether the probes include text ladders: only when PT has two agents or more to weigh."""
    return PT in recipe.scores and len(recipe.scores[PT].agents) >= 2


def split_recipe(recipe: Recipe) -> tuple[Recipe | None, Recipe | None]:
    """The recipe's image-level scores, and its sample-level scores plus the image agents they read.

    PT is left out of the sample part unless it has two agents or more: its probes are the text
    ladders, built only then (:func:`pt_probed`), so its agents would score IM probes for nothing.
    Both have probes and content clusters disabled (a probe run never probes itself, and its rows are
    not a pool to cluster). None where a part would be empty.
    """
    bound = recipe.build_agents()
    image_scores = {b.score for b in bound if b.agent.unit == Unit.IMAGE}
    sample_scores = {b.score for b in bound if b.agent.unit == Unit.SAMPLE}
    needed = {c for b in bound if b.agent.unit == Unit.SAMPLE for c in b.agent.needs}
    read = {b.column for b in bound if b.agent.unit == Unit.IMAGE and any(
        c == b.column or c.startswith(b.column + ".") for c in needed)}
    off = {"enabled": False}

    def part(scores: dict[str, Any]) -> Recipe | None:
        if not scores:
            return None
        return recipe.model_copy(
            update={"scores": scores, "probes": recipe.probes.model_copy(update=off), "clusters": None}
        )

    image_part = {s: spec for s, spec in recipe.scores.items() if s in image_scores and s not in sample_scores}
    sample_part: dict[str, Any] = {}
    for score, spec in recipe.scores.items():
        if score == PT and not pt_probed(recipe):
            continue
        if score in sample_scores:
            sample_part[score] = spec
        else:
            kept = [a for a in spec.agents if f"{score}.{a.name}" in read]
            if kept:
                sample_part[score] = spec.model_copy(update={"agents": kept})
    return part(image_part), part(sample_part)


def run_probes(
    recipe: Recipe,
    run_dir: Path,
    table: pa.Table,
    inp: Input,
    image_root: Path,
    score_part: Callable[[Recipe, Path, Path, Path], dict[str, Any]],
) -> dict[str, Any]:
    """Build, score and store the probes of a scored pool; returns the ``probes`` section of run.json.

    ``table`` is the pool's assembled score table (``row``, ``image_key``, ``image_keys``,
    ``error_kind``); ``score_part(recipe, data, run_dir, image_root)`` scores one part (the
    caller's own scoring entry, so the probes run on the same executor).
    """
    started = time.perf_counter()
    options: ProbeOptions = recipe.probes
    folder = RunFolder(run_dir).probes
    image_recipe, sample_recipe = split_recipe(recipe)
    with_pt = pt_probed(recipe)
    image_rows, sample_rows = _calibration(table, options.seed, options)
    if image_recipe is None:
        image_rows = []
    if sample_recipe is None:
        sample_rows = []
    loaded = _load_rows(inp, table, set(image_rows) | set(sample_rows), ImageSource(image_root, recipe.images),
                        options.max_side)
    plan = _Plan(folder)
    _add_image_ladders(plan, loaded, image_rows)
    if sample_rows:
        _add_sample_ladders(plan, loaded, sample_rows, with_pt, options.seed, options.others)
    del loaded
    parts = []
    for label, records, part_recipe in (
        ("image", plan.image_records, image_recipe),
        ("sample", plan.sample_records, sample_recipe),
    ):
        if not records or part_recipe is None:
            continue
        data, part = folder.data(label), folder.part(label)
        _write_if_changed(data, _jsonl(records))
        try:
            record = score_part(part_recipe, data, part.path, folder.path)
        except WorkDirMismatch:  # other probe options than last time: a new probe set, stored results reused
            WorkDir(part.path).reset_claim()
            record = score_part(part_recipe, data, part.path, folder.path)
        parts.append(pq.read_table(part.scores))
        del record
    probes = _probe_table(parts, plan.manifest)
    atomic_write_table(folder.table, probes)
    seconds = time.perf_counter() - started
    counts = {t: len({m["ladder"] for m in plan.manifest if m["target"] == t}) for t in (VISUAL, PLACEMENT, TEXT)}
    return {
        "path": str(folder.table),
        "ladders": counts,
        "rows": probes.num_rows,
        "seconds": round(seconds, 3),
        "options": options.model_dump(mode="json"),
    }


def _probe_table(parts: list[pa.Table], manifest: list[dict[str, Any]]) -> pa.Table:
    """The manifest joined with every part's scores (by sample id; a row appears once per target)."""
    manifest_table = pa.Table.from_pylist(
        manifest,
        schema=pa.schema([("sample_id", pa.string()), ("target", pa.string()), ("ladder", pa.int64()),
                          ("kind", pa.string()), ("tier", pa.int64()), ("chain", pa.string())]),
    )
    if not parts:
        return manifest_table
    scores = pa.concat_tables(parts, promote_options="permissive")
    # agent columns (``<score>.<agent>[.<field>]``) only: the part runs' own fused columns are not probes
    # (numeric ones: the probes compare scores; list fields such as tagger labels cannot be joined)
    numeric = {f.name for f in scores.schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)}
    keep = [c for c in scores.column_names
            if ("." in c and c in numeric) or c in ("sample_id", "image_key", "error_kind", "error")]
    joined = manifest_table.join(scores.select(keep), "sample_id", join_type="left outer")
    return joined.sort_by([("target", "ascending"), ("ladder", "ascending"), ("tier", "ascending"),
                           ("sample_id", "ascending")])


def read_probes(run_dir: Path | str) -> pa.Table | None:
    """``RUN_DIR/probes/probes.parquet``, or None when the run has no probes."""
    path = RunFolder(run_dir).probes.table
    if not path.is_file():
        return None
    return pq.read_table(path)
