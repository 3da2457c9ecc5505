"""The image gate: images that a guard agent finds information-free leave the selection first.

Ranking images against each other (over the pool, or within a content cluster, see
:mod:`visa.selection.crops`) is relative: a pure-noise image that lands among plain rendered digits
can outrank them on region counts or encoded bits, and a cluster made only of damaged images keeps
its best half. The gate is absolute. ``image_gate`` maps score-table columns to a minimum; a row
whose value in any of them is below its minimum (``value < minimum``) is dropped with the reason
``image_gate`` before the image cut, and takes no part in the image percentiles nor in its
cluster's share of the budget. A null value (the agent could not score the image) passes: the gate
drops only what a guard positively found. The embedded recipe gates on its two guards,
``sc.pixel_correlation`` (uniform noise and flat images score below 1) and ``sc.block_grid``
(heavy JPEG scores below 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from visa.selection.options import SelectionError

if TYPE_CHECKING:
    from visa.selection.stages import State


class GateError(SelectionError):
    """The gate names a column the score table does not have, or one that is not numeric."""


def gate_failures(table: pa.Table, gate: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per gate column, which rows are below its minimum (null values pass)."""
    out: dict[str, np.ndarray] = {}
    for column, minimum in gate.items():
        if column not in table.column_names:
            from visa.registry import did_you_mean

            raise GateError(
                f"image_gate column '{column}' is not in the score table"
                f"{did_you_mean(column, table.column_names)}"
            )
        try:
            values = table.column(column).cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise GateError(f"image_gate column '{column}' must be numeric") from None
        x = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        out[column] = ~np.isnan(x) & (x < minimum)
    return out


def gated_rows(table: pa.Table, gate: Mapping[str, float] | None) -> tuple[np.ndarray, dict[str, int]]:
    """Rows the gate drops (any column below its minimum) and how many rows each column fails."""
    failed = np.zeros(table.num_rows, dtype=bool)
    counts: dict[str, int] = {}
    for column, below in gate_failures(table, gate or {}).items():
        failed |= below
        counts[column] = int(below.sum())
    return failed, counts


def gate_stage(state: State) -> None:
    """Drop the rows the ``image_gate`` finds below a minimum (reason ``image_gate``), with a note
    of how many each column caught."""
    gate = state.options.image_gate
    if not gate:
        return
    failed, counts = gated_rows(state.table, gate)
    state.drop(state.valid & failed, "image_gate")
    caught = ", ".join(f"{column} < {gate[column]:g}: {count}" for column, count in counts.items())
    state.notes.append(f"image gate: {int((state.valid & failed).sum())} rows dropped ({caught})")
