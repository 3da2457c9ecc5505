"""The image gate: rows below a guard column's minimum are found; nulls pass; bad columns are refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from visa.selection.gate import GateError, gated_rows


def table() -> pa.Table:
    return pa.table({
        "sc.pixel_correlation": pa.array([1.0, 0.02, None, 1.0, 0.0], pa.float64()),
        "sc.block_grid": pa.array([0.0, 0.0, -12.5, None, 0.0], pa.float64()),
        "meta.family": pa.array(["a", "b", "c", "d", "e"]),
    })


def test_any_column_below_its_minimum_gates_the_row() -> None:
    failed, counts = gated_rows(table(), {"sc.pixel_correlation": 1.0, "sc.block_grid": 0.0})
    assert failed.tolist() == [False, True, True, False, True]
    assert counts == {"sc.pixel_correlation": 2, "sc.block_grid": 1}  # row 1 and 4; row 2


def test_minimum_is_inclusive_and_nulls_pass() -> None:
    failed, _ = gated_rows(table(), {"sc.pixel_correlation": 0.0})
    assert not failed.any()  # 0.0 >= 0.0 passes; the null of row 2 is not judged
    failed, _ = gated_rows(table(), {"sc.block_grid": -20.0})
    assert not failed.any()


def test_no_gate_gates_nothing() -> None:
    for gate in (None, {}):
        failed, counts = gated_rows(table(), gate)
        assert failed.dtype == bool and not failed.any() and counts == {}


def test_bad_columns_are_refused() -> None:
    with pytest.raises(GateError, match="did you mean 'sc.pixel_correlation'"):
        gated_rows(table(), {"sc.pixel_corelation": 1.0})
    with pytest.raises(GateError, match="must be numeric"):
        gated_rows(table(), {"meta.family": 1.0})


def test_integer_columns_are_compared_as_numbers() -> None:
    t = pa.table({"image.stats.width": pa.array([4, 64, 640], pa.int32())})
    failed, _ = gated_rows(t, {"image.stats.width": 32})
    assert np.array_equal(failed, [True, False, False])
