"""Model-free, two-stage ViSA selection over a finished run (``RUN_DIR/scores.parquet`` + ``run.json``).

Re-selecting never runs a model: it reads the score table, fuses each score family's agents with
Shapley weights (:mod:`visa.fusion`), then applies the stages below in order. Every row that is not
selected gets exactly one ``reason``: the first stage that removed it.

``error``
    Rows with an ``error_kind`` are never selected.
``image_gate``
    With ``image_gate`` (a mapping of score-table columns to minimums; the embedded recipe gates
    on its ``sc.pixel_correlation`` and ``sc.block_grid`` guards), rows whose value in any of the
    columns is below its minimum: images a guard found information-free (uniform noise, a flat
    image, heavy JPEG damage). They take no part in the image ranking nor in the clusters' budget
    shares (:mod:`~visa.selection.gate`).
``atypical``
    With content clusters, each cluster's ``cluster_atypical`` fraction (default 0.2) of its rows
    still in the running that are least typical of it (``cluster_typicality``: the row's image
    embedding against its cluster's mean; :mod:`~visa.selection.crops`): conversations on an image
    unlike the images of their kind.
``text_only``
    Only with ``text_only="drop"``. By default text-only samples (no ``image_key``) bypass the image
    stage: they have no visual score and compete in the instruction stage on IM/PT alone.
``image_below_cut`` (stage 1, images)
    The visual score of a unique image is the weighted mean of the percentile ranks, over unique
    images, of the fused visual families (default ``sc``, ``oa``, ``dp``; weights: ``visual_weights``
    when given, else with ``value: probes`` the families' Shapley weights on the run's image probes,
    else equal; a missing family is skipped and the weights renormalised; an image with no visual
    value at all ranks last). Images are ordered by visual score (ties: the image's first row). With
    ``image_keep: probes`` (default) the images below the cut calibrated on the image probes are
    dropped (:mod:`visa.probes.calibrate`), but never so many that the kept images cannot give the
    budget its samples (a note says so); a run without probes keeps half (with a note). With a
    number, the top ``image_keep`` fraction (rounded half up) is kept. Skipped when no visual family
    exists.
    With content clusters (see :mod:`~visa.selection.crops`) the percentile ranks are taken among
    the images of the same cluster; a fixed ``image_keep`` fraction is kept per cluster.
``im_nonpositive`` (stage 2, instructions)
    With ``im_min: probes`` (default): samples whose fused IM is below the cut calibrated on the IM
    probes (the value separating conversations on their own image from the same conversations on
    another or a flat image). With a number: samples whose IM is ``<= im_min`` on the
    Shapley-weighted mean of the **raw** IM agents (fused scores are z-scores, whose zero is the
    calibration mean), meaningful when the IM agents share a unit, as the reference's MLLM
    cross-entropy differences do; a run without probes falls back to this with 0 (and a note). A
    null IM is not dropped here. With clusters, each cluster's best ``cluster_im_floor`` fraction by
    IM is spared.
``pt_tail``
    The ``pt_tail`` fraction (default 2%) of error-free rows with the highest fused PT (rounded half
    up; ties: lower row first), i.e. the garbled-text tail, measured over the whole pool so the cut
    does not depend on the other stages.
``duplicate``
    With ``dedupe`` (default on) a sample whose image set and conversation both repeat a
    better-ranked sample; this needs a ``text_hash`` column in the score table and is skipped (with
    a note) without one. With ``max_per_image = k``, samples ranked below the k best on the same
    image. Images reused by many different instructions (LLaVA) are kept by default.
``quota`` / ``budget``
    The survivors are ranked by the instruction score (percentile of fused IM over the pool, blended
    ``(1 - pt_blend) * pct(IM) + pt_blend * pct(PT)``; without IM or PT, by visual score; nulls last;
    ties by row) and the first ``budget`` are taken. With ``quota_field`` the budget is shared
    between the values of that column (see :func:`_quota_take`). A survivor that quotas push out of
    the budget gets ``quota``; one ranked beyond the budget gets ``budget``.
    Without a quota field but with clusters, the budget is spread over the clusters (proportional
    to their pools, or balanced towards equal shares with ``cluster_balance``) and ``quota`` marks
    the survivors their cluster's share pushed out.

Outputs (all deterministic: same inputs and options give byte-identical files):
``selection.parquet`` (``row, sample_id, selected, rank, visual_score, instruction_score, reason``),
the selected records in the input's own format (``selected.json`` / ``.jsonl`` / ``.parquet`` /
``selected/``), ``dataset_info.json`` (a LLaMA-Factory entry), and ``shapley`` + ``selection``
sections merged into ``run.json``.

The package: :mod:`~visa.selection.options` (the knobs; all a recipe imports),
:mod:`~visa.selection.ranks` (vectorised ranking helpers), :mod:`~visa.selection.stages` (one
function per stage over a small state), :mod:`~visa.selection.export` (the files a selection
writes) and :mod:`~visa.selection.folder` (:func:`select` over a run folder). Names are imported
from here lazily, so importing the options does not import the stages.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_WHERE = {
    "OFF": "options",
    "DEFAULT_PERMUTATIONS": "options",
    "SelectionError": "options",
    "SelectionOptions": "options",
    "parse_budget": "options",
    "parse_weights": "options",
    "budget_rows": "options",
    "resolve_options": "options",
    "percentile_ranks": "ranks",
    "rank_within_groups": "ranks",
    "REASONS": "stages",
    "TEXT_HASH": "stages",
    "select_table": "stages",
    "quota_take": "stages",
    "DATASET_NAME": "export",
    "llamafactory_entry": "export",
    "write_selection_table": "export",
    "write_subset": "export",
    "SelectionResult": "folder",
    "open_source": "folder",
    "read_run": "folder",
    "run_families": "folder",
    "select": "folder",
}
#: Older private names, kept importable.
_ALIASES = {"_descending": ("ranks", "descending"), "_top": ("ranks", "top")}

if TYPE_CHECKING:
    from visa.selection.export import (
        DATASET_NAME,
        llamafactory_entry,
        write_selection_table,
        write_subset,
    )
    from visa.selection.folder import SelectionResult, open_source, read_run, run_families, select
    from visa.selection.options import (
        DEFAULT_PERMUTATIONS,
        OFF,
        SelectionError,
        SelectionOptions,
        budget_rows,
        parse_budget,
        parse_weights,
        resolve_options,
    )
    from visa.selection.ranks import percentile_ranks, rank_within_groups
    from visa.selection.stages import REASONS, TEXT_HASH, quota_take, select_table

__all__ = [
    "DATASET_NAME",
    "DEFAULT_PERMUTATIONS",
    "OFF",
    "REASONS",
    "SelectionError",
    "SelectionOptions",
    "SelectionResult",
    "TEXT_HASH",
    "budget_rows",
    "llamafactory_entry",
    "open_source",
    "parse_budget",
    "parse_weights",
    "percentile_ranks",
    "quota_take",
    "rank_within_groups",
    "read_run",
    "resolve_options",
    "run_families",
    "select",
    "select_table",
    "write_selection_table",
    "write_subset",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        module, attribute = _WHERE[name], name
    elif name in _ALIASES:
        module, attribute = _ALIASES[name]
    else:
        raise AttributeError(f"module 'visa.selection' has no attribute '{name}'")
    return getattr(import_module(f"visa.selection.{module}"), attribute)
