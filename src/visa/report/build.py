"""Assemble the report: aggregate the run folder into small tables, charts and galleries, render HTML."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from visa.report import gallery as gal
from visa.report import plots
from visa.report.data import (
    REASON_TEXT,
    Family,
    ReportError,
    RunData,
    aux_columns,
    load_run,
)
from visa.run_folder import FamilyFusion, InputRecord, ProbeFusion, RunFolder, SelectionSummary, atomic_write

CORRELATION_SAMPLE = 100_000
ERROR_EXAMPLES = 3
MALFORMED_SHOWN = 40
AUX_SHOWN = 5


def build_report(run_dir: Path, *, out: Path | None = None, gallery_size: int = 12, seed: int = 0) -> Path:
    """Write a self-contained HTML report of a run folder and return its path.

    Reads ``run_dir/run.json``, ``run_dir/scores.parquet`` and, when present,
    ``run_dir/selection.parquet``; re-reads from the input only the records it shows. ``out``
    defaults to ``run_dir/report.html``. ``gallery_size`` is the number of thumbnails per gallery
    strip (top, bottom and random per score; selected; dropped per reason); 0 leaves galleries out
    and never opens the input. ``seed`` fixes the random strips, so the same run gives the same report.
    Raises :class:`ReportError` (one clear line) when ``run_dir`` is not a readable run folder.
    """
    if gallery_size < 0:
        raise ReportError("gallery_size must be >= 0")
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    html = render(_Builder(data, gallery_size=gallery_size, seed=seed).context())
    target = Path(out) if out is not None else RunFolder(run_dir).report
    try:
        atomic_write(target, html.encode("utf-8"))
    except OSError as err:
        raise ReportError(f"cannot write the report to {target}: {err.strerror or err}") from None
    return target


def render(context: Mapping[str, Any]) -> str:
    import jinja2

    text = resources.files("visa.report").joinpath("template.html").read_text(encoding="utf-8")
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    return env.from_string(text).render(**context)


def fmt(value: Any) -> str:
    """A score or measurement for people: 3 significant figures near 1, grouped thousands beyond."""
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "–"
    if v == int(v) and abs(v) >= 1000:
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) < 1e-9:
        return "0"
    if abs(v) >= 0.01:
        return f"{v:.2f}" if v != int(v) else f"{int(v)}"
    return f"{v:.2g}"


def fmt_int(value: Any) -> str:
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "–"


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "–"


def _average_ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3:
        return float("nan")
    sa, sb = a.std(), b.std()
    if not (sa > 0 and sb > 0):
        return float("nan")
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


class _Builder:
    def __init__(self, data: RunData, *, gallery_size: int, seed: int) -> None:
        self.data = data
        self.k = gallery_size
        self.seed = seed
        self.plot = plots.Plotter("r")
        self.notes = list(data.notes)
        self.valid = ~data.error
        self._image_index: gal.ImageIndex | None = None
        self._item_cache: dict[tuple[str, str], np.ndarray] = {}

    # -- context -----------------------------------------------------------------------------------
    def context(self) -> dict[str, Any]:
        d = self.data
        run = d.run
        recipe = run.recipe or {}
        input_spec = run.input or InputRecord()
        families = [self._family(i, f) for i, f in enumerate(d.families)]
        selection = self._selection()
        galleries = self._galleries() if self.k else []
        dropped = self._dropped() if self.k and d.selection is not None else []
        selected_cards = self._selected_cards() if self.k and d.selection is not None else []
        examples = self._positions([r["example_row"] for r in (selection or {}).get("clusters", [])])
        self._fill_cards(galleries, dropped, selected_cards, examples)
        for row, card in zip((selection or {}).get("clusters", []), examples, strict=False):
            row["example"] = card
        if selection is not None:
            selection["gallery"] = selected_cards
        sections = [("overview", "Overview")]
        if selection is not None:
            sections.append(("selection", "Selection"))
        if families:
            sections.append(("scores", "Scores"))
        correlation = self._correlation()
        if correlation is not None:
            sections.append(("correlation", "Score correlations"))
        if galleries:
            sections.append(("galleries", "Galleries"))
        if dropped:
            sections.append(("dropped", "Dropped samples"))
        breakdowns = self._breakdowns()
        if breakdowns:
            sections.append(("breakdown", "Breakdown"))
        errors = self._errors()
        sections.append(("errors", "Errors"))
        return {
            "title": f"visa report · {recipe.get('name') or d.run_dir.name}",
            "header": {
                "run_dir": str(d.run_dir),
                "input": input_spec.path or "–",
                "format": input_spec.format or "–",
                "image_root": input_spec.image_root or "–",
                "recipe": recipe.get("name") or "–",
                "recipe_description": recipe.get("description") or "",
                "created": run.created or "–",
                "version": run.visa_version or "–",
            },
            "sections": sections,
            "kpis": self._kpis(),
            "timings": self._timings(),
            "selection": selection,
            "families": families,
            "family_toc": [(f["anchor"], f["name"]) for f in families],
            "correlation": correlation,
            "galleries": galleries,
            "dropped": dropped,
            "breakdowns": breakdowns,
            "errors": errors,
            "notes": self.notes,
            "gallery_size": self.k,
            "thumb_px": gal.THUMB_PX,
        }

    # -- overview ----------------------------------------------------------------------------------
    def _kpis(self) -> list[dict[str, str]]:
        d = self.data
        counts = d.run.counts
        records = d.n if counts.records is None else counts.records
        ok = int(self.valid.sum()) if counts.ok is None else counts.ok
        unique = counts.unique_images
        if unique is None:  # run.json without counts: the same definition as visa.fusion.unique_image_count
            unique = int(np.unique(d.image_codes[self.valid & (d.image_codes >= 0)]).size)
        text_only = counts.text_only
        if text_only is None:
            text_only = int((self.valid & (d.image_codes < 0)).sum())
        n_errors = sum(counts.errors.values()) if counts.errors else int(d.error.sum())
        out = [
            {"label": "records", "value": fmt_int(records), "hint": "rows of the score table"},
            {"label": "scored without error", "value": fmt_int(ok), "hint": _pct(_num(ok), _num(records))},
            {"label": "unique images", "value": fmt_int(unique), "hint": "scored once each"},
            {"label": "text-only samples", "value": fmt_int(text_only), "hint": "no image"},
            {
                "label": "errors",
                "value": fmt_int(n_errors),
                "hint": _pct(n_errors, _num(records)),
                "bad": n_errors > 0,
            },
            {
                "label": "malformed records",
                "value": fmt_int(counts.malformed or 0),
                "hint": "unreadable JSON / fields",
                "bad": bool(counts.malformed),
            },
        ]
        if d.selection is not None:
            chosen = int(d.selection.selected.sum())
            out.append(
                {"label": "selected", "value": fmt_int(chosen), "hint": _pct(chosen, d.n), "good": True}
            )
        return [{"bad": False, "good": False, **k} for k in out]

    def _timings(self) -> dict[str, Any]:
        timings = self.data.run.timings
        rows = []
        for column, stats in timings.agents.items():
            items, seconds = float(stats.items), float(stats.seconds)
            rows.append(
                {
                    "column": str(column),
                    "n_items": fmt_int(items),
                    "errors": fmt_int(stats.errors),
                    "seconds": fmt(seconds),
                    "rate": f"{items / seconds:,.1f}/s" if seconds > 0 else "–",
                }
            )
        totals = [
            (label, fmt(value) + " s")
            for value, label in (
                (timings.scoring_seconds, "scoring"),
                (timings.assemble_seconds, "assembly"),
                (timings.total_seconds, "total"),
            )
            if value is not None
        ]
        return {"agents": rows, "totals": totals}

    # -- selection ---------------------------------------------------------------------------------
    def _selection(self) -> dict[str, Any] | None:
        d = self.data
        sel = d.selection
        if sel is None:
            return None
        summary = d.run.selection or SelectionSummary()
        counts = np.bincount(sel.reason[sel.reason >= 0], minlength=len(sel.reasons))
        selected = int(sel.selected.sum())
        dropped = [(reason, int(counts[i])) for i, reason in enumerate(sel.reasons) if counts[i]]
        reasons = [
            {"reason": reason, "count": fmt_int(n), "share": _pct(n, d.n), "text": REASON_TEXT.get(reason, "")}
            for reason, n in dropped
        ]
        quota = summary.quota
        quota_rows = [
            {**{str(k): fmt_int(v) for k, v in stats.items()}, "group": str(group)}
            for group, stats in list(quota.groups.items() if quota else [])[:50]
        ]
        clusters = summary.clusters or {}
        return {
            "chart": (
                self._outcome_chart([("selected", selected)] + [(f"dropped: {r}", n) for r, n in dropped])
                if d.n
                else None
            ),
            "selected": fmt_int(selected),
            "selected_share": _pct(selected, d.n),
            "reasons": reasons,
            "facts": _selection_facts(summary),
            "quota": quota_rows,
            "quota_field": str(quota.field) if quota else "",
            "quota_columns": list(dict.fromkeys(k for row in quota_rows for k in row if k != "group")),
            "clusters": _cluster_rows(clusters),
            "clusters_column": str(clusters.get("column") or ""),
            "clusters_budget": str(clusters.get("budget") or ""),
            "notes": list(summary.notes),
            "gallery": [],
        }

    def _outcome_chart(self, outcomes: list[tuple[str, int]]) -> str:
        """Where every sample went: one bar (and colour) per outcome, the first one selected."""
        series = []
        for i, (label, value) in enumerate(outcomes):
            column = np.zeros(len(outcomes))
            column[i] = value
            series.append((label, column, plots.SELECTED if i == 0 else plots.DROPPED))
        labels = [label for label, _ in outcomes]
        return self.plot.bars(labels, series, title="Where every sample went", xlabel="samples", legend=False)

    # -- scores ------------------------------------------------------------------------------------
    def _family(self, index: int, family: Family) -> dict[str, Any]:
        d = self.data
        anchor = f"score-{index}"
        # a single agent is shown in its own unit (its fused score is the same ranking, z-scored)
        column = family.agents[0] if len(family.agents) == 1 else family.ranking_column
        values = d.value(column)
        result: dict[str, Any] = {
            "anchor": anchor,
            "name": family.name,
            "title": family.title,
            "hint": family.hint,
            "unit": family.unit,
            "column": column or "–",
            "fused": family.fused is not None,
            "stats": [],
            "histogram": None,
            "agents": [],
            "pearson": None,
            "pearson_source": "",
            "agent_histograms": None,
            "shapley_facts": [],
            "shapley_notes": [],
        }
        if values is None:
            return result
        present = self.valid & np.isfinite(values)
        population = np.zeros(d.n, dtype=bool)
        population[self._items(column, family.unit)] = True
        v = values[present]
        if v.size:
            q = np.percentile(v, [0, 5, 50, 95, 100])
            result["stats"] = [
                ("samples with a value", fmt_int(v.size)),
                *([("unique images with a value", fmt_int(int(population.sum())))] if family.unit == "image" else []),
                ("missing", fmt_int(int((self.valid & ~np.isfinite(values)).sum()))),
                ("mean", fmt(v.mean())),
                ("min · 5% · median · 95% · max", " · ".join(fmt(x) for x in q)),
            ]
            edges = plots.bin_edges(v)
            label = f"{column}" + (" (fused z-score)" if column == family.fused else "")
            if d.selection is not None:
                chosen = d.selection.selected[present]
                series = [
                    ("selected", plots.counts(v[chosen], edges), plots.SELECTED),
                    ("not selected", plots.counts(v[~chosen], edges), plots.DROPPED),
                ]
            else:
                series = [("samples", plots.counts(v, edges), plots.ALL)]
            result["histogram"] = self.plot.histogram(
                edges,
                series,
                title=f"{family.name}: distribution over samples",
                xlabel=label,
                draw_title=False,
                compare=d.selection is not None,
            )
        else:
            result["stats"] = [("samples with a value", "0")]
        self._agents(family, result, population)
        return result

    def _agents(self, family: Family, result: dict[str, Any], population: np.ndarray) -> None:
        d = self.data
        report = family.shapley or FamilyFusion()
        names = list(report.agents)
        agents = list(dict.fromkeys(family.agents + [n for n in names if n in d.values]))
        result["agents"] = self._agent_rows(agents, report)
        if family.shapley is not None:
            result["shapley_facts"] = _shapley_facts(report, family.unit)
            if report.note:
                result["shapley_notes"].append(str(report.note))
            result["shapley_notes"].extend(report.warnings)
        # agreement between agents: the calibration Pearson matrix when recorded, else computed here
        matrix, labels = _recorded_pearson(report)
        if matrix is not None:
            result["pearson_source"] = "on the Shapley calibration sample (z-scored agents)"
        elif len(agents) >= 2:
            matrix, labels = self._computed_pearson(agents, population), agents
            result["pearson_source"] = (
                f"computed from the score table over {fmt_int(self._pearson_rows(population).size)} "
                f"{'unique images' if family.unit == 'image' else 'samples'}"
            )
        if matrix is not None and matrix.shape[0] >= 2:
            result["pearson"] = self.plot.heatmap(matrix, labels, title="Agents' Pearson agreement")
        if len(agents) > 1:
            result["agent_histograms"] = self._agent_histograms(family, agents, population)

    def _agent_rows(self, agents: list[str], report: FamilyFusion) -> list[dict[str, Any]]:
        """One table row per agent: Shapley weight, exclusion, models and timing."""
        listed = {a.column: a for a in self.data.run.agents}
        timings = self.data.run.timings.agents
        weights = report.weight_of()
        probed = _probe_columns(report.probes)
        rows = []
        for column in agents:
            models = listed[column].models if column in listed else None
            if isinstance(models, Mapping):
                models = ", ".join(f"{k}: {v}" if v else str(k) for k, v in models.items())
            elif isinstance(models, list):
                models = ", ".join(str(m) for m in models)
            stats = timings.get(column)
            w = weights.get(column)
            stderr = report.stderr.get(column)
            rows.append(
                {
                    "column": column,
                    "weight": fmt(w) if w is not None else ("1" if len(agents) == 1 else "–"),
                    "weight_value": float(w) if w is not None else None,
                    "stderr": fmt(stderr) if stderr is not None else "",
                    "excluded": str(report.excluded.get(column, "")),
                    **probed.get(column, {"probe_auroc": "–", "interval": "", "no_information": False}),
                    "models": str(models or ""),
                    "n_items": fmt_int(stats.items) if stats is not None else "–",
                    "seconds": fmt(stats.seconds) if stats is not None else "–",
                }
            )
        return rows

    def _pearson_rows(self, population: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(population)
        return gal.sample(rows, CORRELATION_SAMPLE, np.random.default_rng(self.seed))

    def _computed_pearson(self, agents: list[str], population: np.ndarray) -> np.ndarray:
        """Pairwise Pearson of the agents' raw values over (a sample of) the family's population."""
        rows = self._pearson_rows(population)
        columns = [self.data.values[a][rows] for a in agents]
        matrix = np.full((len(agents), len(agents)), np.nan)
        for i in range(len(agents)):
            for j in range(len(agents)):
                both = np.isfinite(columns[i]) & np.isfinite(columns[j])
                matrix[i, j] = _pearson(columns[i][both], columns[j][both])
        return matrix

    def _agent_histograms(self, family: Family, agents: list[str], population: np.ndarray) -> str | None:
        panels = []
        for column in agents:
            v = self.data.values[column][population]
            v = v[np.isfinite(v)]
            edges = plots.bin_edges(v, bins=30)
            if edges is not None:
                panels.append((column, edges, plots.counts(v, edges)))
        if not panels:
            return None
        return self.plot.small_histograms(panels, title=f"{family.name}: raw agent values")

    def _correlation(self) -> dict[str, Any] | None:
        d = self.data
        columns = [
            (f.name, d.values[f.ranking_column])
            for f in d.families
            if f.ranking_column and f.ranking_column in d.values
        ]
        if len(columns) < 2:
            return None
        rows = gal.sample(np.flatnonzero(self.valid), CORRELATION_SAMPLE, np.random.default_rng(self.seed))
        k = len(columns)
        ranks = []
        for _, values in columns:  # each score ranked once over its values in the sample
            sampled = values[rows]
            ranked = np.full(sampled.shape, np.nan)
            present = np.isfinite(sampled)
            if present.any():
                ranked[present] = _average_ranks(sampled[present])
            ranks.append(ranked)
        matrix = np.full((k, k), np.nan)
        pairs = np.zeros((k, k), dtype=np.int64)
        for i in range(k):
            for j in range(i, k):
                both = np.isfinite(ranks[i]) & np.isfinite(ranks[j])
                pairs[i, j] = pairs[j, i] = int(both.sum())
                if both.sum() >= 3:
                    matrix[i, j] = matrix[j, i] = _pearson(ranks[i][both], ranks[j][both])
        chart = self.plot.heatmap(
            matrix, [c[0] for c in columns], title="Spearman rank correlation between scores"
        )
        return {"chart": chart, "rows": fmt_int(rows.size), "min_pairs": fmt_int(pairs.min())}

    # -- galleries ---------------------------------------------------------------------------------
    def _items(self, column: str, unit: str) -> np.ndarray:
        """Error-free positions with a value in ``column``: the first row of each image when
        ``unit`` is "image" (an image shared by many samples counts once), else every row."""
        key = (column, unit)
        if key not in self._item_cache:
            mask = self.valid & np.isfinite(self.data.values[column])
            if unit == "image":
                if self._image_index is None:
                    self._image_index = gal.ImageIndex(self.data.image_codes)
                self._item_cache[key] = self._image_index.first(mask)
            else:
                self._item_cache[key] = np.flatnonzero(mask)
        return self._item_cache[key]

    def _galleries(self) -> list[dict[str, Any]]:
        d = self.data
        out = []
        for index, family in enumerate(d.families):
            values = d.value(family.ranking_column)
            if values is None:
                continue
            candidates = self._items(family.ranking_column, family.unit)
            if candidates.size == 0:
                continue
            rng = np.random.default_rng([self.seed, index])
            noun = "images" if family.unit == "image" else "samples"
            random = gal.sample(candidates, self.k, rng)
            random = random[np.argsort(-values[random], kind="stable")]
            strips = [
                ("top", f"Highest {family.name}", gal.top(values, d.rows, candidates, self.k, highest=True)),
                (
                    "bottom",
                    f"Lowest {family.name}",
                    gal.top(values, d.rows, candidates, self.k, highest=False),
                ),
                ("random", "Random", random),
            ]
            out.append(
                {
                    "anchor": f"gallery-{index}",
                    "name": family.name,
                    "title": family.title,
                    "noun": noun,
                    "candidates": fmt_int(candidates.size),
                    "strips": [
                        {"key": key, "label": label, "positions": pos, "cards": []}
                        for key, label, pos in strips
                    ],
                }
            )
        return out

    def _dropped(self) -> list[dict[str, Any]]:
        d = self.data
        sel = d.selection
        assert sel is not None
        out = []
        for i, reason in enumerate(sel.reasons):
            if reason == "error":
                continue
            candidates = np.flatnonzero(sel.reason == i)
            if candidates.size == 0:
                continue
            rng = np.random.default_rng([self.seed, 1000 + i])
            out.append(
                {
                    "key": reason,
                    "label": reason,
                    "text": REASON_TEXT.get(reason, ""),
                    "count": fmt_int(candidates.size),
                    "positions": gal.sample(candidates, self.k, rng),
                    "cards": [],
                }
            )
        return out

    def _selected_cards(self) -> list[int]:
        sel = self.data.selection
        assert sel is not None
        chosen = np.flatnonzero(sel.selected)
        if chosen.size == 0:
            return []
        return list(gal.top(-sel.rank, self.data.rows, chosen, self.k, highest=True))

    def _positions(self, rows: Sequence[int | None]) -> list[Any]:
        """Table positions of input ``rows`` (None where a row is unknown or not given)."""
        wanted = {int(r) for r in rows if r is not None}
        found = np.flatnonzero(np.isin(self.data.rows, np.fromiter(wanted, dtype=np.int64)))
        at = {int(self.data.rows[p]): int(p) for p in found}
        return [at.get(int(r)) if r is not None else None for r in rows]

    def _fill_cards(
        self, galleries: list[dict[str, Any]], dropped: list[dict[str, Any]], selected: list[Any],
        examples: list[Any] | None = None,
    ) -> None:
        """Replace the positions of every strip, of ``selected`` and of ``examples`` (None entries
        stay None) by cards, loading each shown record once."""
        d = self.data
        examples = examples if examples is not None else []
        groups = [s["positions"] for g in galleries for s in g["strips"]] + [s["positions"] for s in dropped]
        groups.append(np.asarray(selected, dtype=np.int64))
        groups.append(np.asarray([p for p in examples if p is not None], dtype=np.int64))
        positions = gal.unique_in_order(groups)
        if not positions:
            return
        aux = aux_columns(pq.read_schema(d.scores_path), d.families)
        extra = d.fields(positions, ["error", *aux])
        wanted = {int(d.rows[p]): (extra[p]["sample_id"], d.image_key(p)) for p in positions}
        shown = gal.load_shown(d.run, wanted, self.notes)
        cards = {p: self._card(p, shown[int(d.rows[p])], extra.get(p, {}), aux) for p in positions}
        for g in galleries:
            family = next(f for f in d.families if f.name == g["name"])
            for strip in g["strips"]:
                strip["cards"] = [{**cards[int(p)], "primary": family.name} for p in strip["positions"]]
        for strip in dropped:
            strip["cards"] = [{**cards[int(p)], "primary": ""} for p in strip["positions"]]
        selected[:] = [{**cards[int(p)], "primary": ""} for p in selected]
        examples[:] = [None if p is None else {**cards[int(p)], "primary": ""} for p in examples]

    def _card(
        self, position: int, shown: gal.Shown, extra: Mapping[str, Any], aux: Sequence[str]
    ) -> dict[str, Any]:
        d = self.data
        scores = []
        for family in d.families:
            values = d.value(family.ranking_column)
            if values is not None:
                scores.append({"name": family.name, "value": fmt(values[position])})
        status = None
        if d.selection is not None:
            if d.selection.selected[position]:
                status = {"kind": "selected", "text": f"selected #{fmt_int(d.selection.rank[position])}"}
            elif d.selection.reason[position] >= 0:
                status = {
                    "kind": "dropped",
                    "text": f"dropped: {d.selection.reasons[d.selection.reason[position]]}",
                }
        details = []
        for column in aux:
            value = extra.get(column)
            if value is None or len(details) >= AUX_SHOWN:
                continue
            if isinstance(value, list):
                text = ", ".join(str(v) for v in value[:8]) + (" …" if len(value) > 8 else "")
            elif isinstance(value, float):
                text = fmt(value)
            else:
                text = gal.strip_text(str(value), 80)
            details.append({"column": column, "name": column.rpartition(".")[2], "value": text})
        return {
            **asdict(shown),
            "position": int(position),
            "sample_id": extra["sample_id"],
            "line": extra.get("line"),
            "scores": scores,
            "status": status,
            "details": details,
            "error": gal.strip_text(str(extra.get("error")), 160) if extra.get("error") else "",
        }

    # -- breakdown ---------------------------------------------------------------------------------
    def _breakdowns(self) -> list[dict[str, Any]]:
        d = self.data
        out = []
        score_families = [f for f in d.families if f.ranking_column in d.values]
        for category in d.categories:
            codes = category.codes
            k = len(category.labels)
            present = codes >= 0
            total = np.bincount(codes[present], minlength=k)
            errors = np.bincount(codes[present & d.error], minlength=k)
            selected = (
                np.bincount(codes[present & d.selection.selected], minlength=k)
                if d.selection is not None
                else None
            )
            means = []
            for family in score_families:
                values = d.values[family.ranking_column]
                ok = present & np.isfinite(values) & self.valid
                sums = np.bincount(codes[ok], weights=values[ok], minlength=k)
                n = np.bincount(codes[ok], minlength=k)
                means.append(np.where(n > 0, sums / np.maximum(n, 1), np.nan))
            rows = []
            top = max(int(total.max()), 1)
            for i, label in enumerate(category.labels):
                rows.append(
                    {
                        "label": label,
                        "count": fmt_int(total[i]),
                        "share": _pct(total[i], d.n),
                        "bar": round(100.0 * total[i] / top, 1),
                        "errors": fmt_int(errors[i]),
                        "selected": fmt_int(selected[i]) if selected is not None else "",
                        "rate": _pct(selected[i], total[i]) if selected is not None else "",
                        "means": [fmt(m[i]) for m in means],
                    }
                )
            if selected is not None:
                series = [
                    ("selected", selected.astype(float), plots.SELECTED),
                    ("not selected", (total - selected).astype(float), plots.DROPPED),
                ]
            else:
                series = [("samples", total.astype(float), plots.ALL)]
            chart = self.plot.bars(
                category.labels, series, title=f"Samples by {category.column}", draw_title=False
            )
            unlabelled = int((~present).sum())
            out.append(
                {
                    "anchor": f"breakdown-{len(out)}",
                    "column": category.column,
                    "chart": chart,
                    "rows": rows,
                    "families": [f.name for f in score_families],
                    "missing": fmt_int(unlabelled) if unlabelled else "",
                    "with_selection": selected is not None,
                }
            )
        return out

    # -- errors ------------------------------------------------------------------------------------
    def _errors(self) -> dict[str, Any]:
        d = self.data
        counts = d.run.counts
        kinds: list[dict[str, Any]] = []
        if d.error_kind is not None and d.error.any():
            encoded = pc.dictionary_encode(d.error_kind).combine_chunks()
            codes = np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
            names = [str(x) for x in encoded.dictionary.to_pylist()]
            tally = np.bincount(codes[codes >= 0], minlength=len(names))
            examples_at: dict[int, list[int]] = {}
            for code in range(len(names)):
                examples_at[code] = [int(p) for p in np.flatnonzero(codes == code)[:ERROR_EXAMPLES]]
            extra = d.fields([p for ps in examples_at.values() for p in ps], ["error"])
            for code in np.argsort(-tally, kind="stable"):
                if not tally[code]:
                    continue
                examples = []
                for p in examples_at[int(code)]:
                    message = extra[p].get("error")
                    examples.append(
                        {
                            "sample_id": extra[p]["sample_id"],
                            "line": extra[p].get("line"),
                            "message": gal.strip_text(str(message), 300) if message else "",
                        }
                    )
                kinds.append(
                    {
                        "kind": names[code],
                        "count": fmt_int(tally[code]),
                        "share": _pct(tally[code], d.n),
                        "examples": examples,
                    }
                )
        malformed_lines = counts.malformed_lines
        return {
            "kinds": kinds,
            "malformed": fmt_int(counts.malformed or 0),
            "malformed_lines": [fmt_int(x) for x in malformed_lines[:MALFORMED_SHOWN]],
            "malformed_more": max(0, len(malformed_lines) - MALFORMED_SHOWN),
        }


def _cluster_rows(report: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One formatted row per content cluster of the selection summary (largest pools first)."""
    rows = []
    merged = (report or {}).get("merged_targets")
    merged = merged if isinstance(merged, list) else None
    for group in (report or {}).get("groups", [])[:100]:
        if not isinstance(group, Mapping):
            continue
        example = group.get("example") if isinstance(group.get("example"), Mapping) else {}
        target = fmt_int(group.get("target")) if group.get("target") is not None else "–"
        shared = group.get("group")
        if merged is not None and isinstance(shared, int) and 0 <= shared < len(merged):
            target = f"group {shared}: {fmt_int(merged[shared])}"  # a budget below the number of clusters
        images, kept = group.get("images"), group.get("images_kept")
        rows.append({
            "cluster": str(group.get("cluster")),
            "pool": fmt_int(group.get("pool")),
            "pool_share": fmt(group.get("pool_share")),
            "images": f"{fmt_int(kept)} of {fmt_int(images)}" if images is not None else "–",
            "survived": fmt_int(group.get("survived_filters")),
            "target": target,
            "selected": fmt_int(group.get("selected")),
            "selected_share": fmt(group.get("selected_share")),
            "example_row": example.get("row") if isinstance(example.get("row"), int) else None,
            "example": None,
        })
    return rows


def _selection_facts(summary: SelectionSummary) -> list[tuple[str, str]]:
    """The selection's budget, image cut, ranking and thresholds, as label / value pairs."""
    options = summary.options
    facts = []
    if summary.budget is not None:
        rows = summary.budget_rows
        facts.append(("budget", f"{summary.budget}" + (f" ({fmt_int(rows)} rows)" if rows is not None else "")))
    if summary.images.unique is not None or summary.images.kept is not None:
        facts.append(("images kept", f"{fmt_int(summary.images.kept)} of {fmt_int(summary.images.unique)}"))
    if options.get("image_keep") is not None:
        facts.append(("image keep fraction", fmt(options.get("image_keep"))))
    if summary.ranked_by:
        facts.append(("ranked by", str(summary.ranked_by)))
    if options.get("im_min") is not None:
        facts.append(("IM threshold", fmt(options.get("im_min"))))
    if summary.pt_cut is not None:
        facts.append(("PT tail cut (fused)", fmt(summary.pt_cut)))
    return facts


def _shapley_facts(report: FamilyFusion, unit: str) -> list[tuple[str, str]]:
    """Calibration size, exact or sampled Shapley values, and the seed of one family's fusion."""
    facts = []
    if report.calibration_size is not None:
        pool = report.calibration_pool
        facts.append(
            (
                "calibration",
                f"{fmt_int(report.calibration_size)} {'images' if unit == 'image' else 'samples'}"
                + (f" of {fmt_int(pool)}" if pool is not None else ""),
            )
        )
    if report.exact is not None:
        facts.append(
            ("Shapley", "exact" if report.exact else f"Monte Carlo, {fmt_int(report.permutations)} permutations")
        )
    if report.seed is not None:
        facts.append(("seed", str(report.seed)))
    if report.value is not None:
        facts.append(("value", _value_fact(report)))
    return facts


def _recorded_pearson(report: FamilyFusion) -> tuple[np.ndarray | None, list[str]]:
    """The calibration Pearson matrix fusion recorded, when it matches the family's agents."""
    names, pearson = list(report.agents), report.pearson
    if not pearson or not names or len(pearson) != len(names) or any(len(row) != len(names) for row in pearson):
        return None, names
    return np.array([[np.nan if x is None else float(x) for x in row] for row in pearson], dtype=float), names


def _num(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def _value_fact(report: FamilyFusion) -> str:
    """The value function, with the probe counts behind it."""
    probes = report.probes
    if report.value == "probes" and probes is not None:
        return f"probes ({fmt_int(probes.pairs)} ordered pairs in {fmt_int(probes.ladders)} ladders)"
    return str(report.value)


def _probe_columns(probes: ProbeFusion | None) -> dict[str, dict[str, Any]]:
    """Per agent: probe AUROC, 5-95% bootstrap interval of its weight, and the no-information flag."""
    if probes is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, value in probes.probe_auroc.items():
        bounds = probes.interval.get(name)
        span = (
            f"[{fmt(bounds[0])}, {fmt(bounds[1])}]"
            if bounds is not None and len(bounds) == 2 and all(b is not None for b in bounds)
            else ""
        )
        out[name] = {
            "probe_auroc": fmt(value) if value is not None else "–",
            "interval": span,
            "no_information": name in probes.no_information,
        }
    return out
