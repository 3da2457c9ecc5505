"""Charts for the report, drawn by matplotlib (Agg) as inline SVG.

Every chart takes pre-aggregated numbers (histogram counts, a correlation matrix, category counts),
never one point per record, so its size and drawing time do not grow with the run. Text is emitted as
SVG ``<text>`` (escaped by matplotlib; math parsing is off, so a ``$`` in a label is just a dollar),
and each figure gets its own id salt so that several inline SVGs never share element ids.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence

import numpy as np

SELECTED = "#2a9d8f"
DROPPED = "#c9ced6"
ALL = "#4c78a8"
AGENT = "#7a8fb3"
INK = "#26303d"
MUTED = "#6b7685"

_RC = {
    "svg.fonttype": "none",
    "text.parse_math": False,
    "text.usetex": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 9.5,
    "axes.edgecolor": "#b7bec8",
    "axes.labelcolor": INK,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.titlecolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "legend.frameon": False,
    "figure.facecolor": "none",
    "axes.facecolor": "none",
    "savefig.facecolor": "none",
    "savefig.transparent": True,
}
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _short(text: str, limit: int = 32) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _svg(fig, salt: str, label: str) -> str:
    matplotlib, plt = _pyplot()
    buffer = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = _METADATA.sub("", text, count=1)
    # keep the natural size (so text is as large as drawn) but never wider than the column
    attrs = f' class="plot" role="img" aria-label="{html.escape(label, quote=True)}"'
    return text.replace("<svg", f"<svg{attrs}", 1)


class Plotter:
    """Draws charts; ``prefix`` makes the element ids of this report's figures unique and stable.

    Margins are set from the label lengths instead of a layout engine, which would draw every
    figure twice.
    """

    def __init__(self, prefix: str = "f") -> None:
        self.prefix = prefix
        self.count = 0

    def _salt(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"

    @staticmethod
    def _margins(fig, *, left: float, right: float, bottom: float, top: float, **space: float) -> None:
        """Margins in inches."""
        width, height = fig.get_size_inches()
        fig.subplots_adjust(
            left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height, **space
        )

    def histogram(
        self,
        edges: np.ndarray,
        series: Sequence[tuple[str, np.ndarray, str]],
        *,
        title: str,
        xlabel: str,
        ylabel: str = "samples",
        width: float = 6.2,
        height: float = 2.8,
        draw_title: bool = True,
        compare: bool = False,
    ) -> str:
        """Histogram of ``series`` (``[(label, counts per bin, colour), ...]``) over ``edges``.

        Stacked counts by default. With ``compare`` each series is drawn as its own distribution (the
        share of its samples per bin), overlaid: a small group such as 2.5% selected samples stays as
        visible as the rest, and the plot shows where each group lies.
        """
        matplotlib, plt = _pyplot()
        with matplotlib.rc_context(_RC):
            fig, ax = plt.subplots(figsize=(width, height))
            bottom = np.zeros(len(edges) - 1)
            for k, (label, counts, colour) in enumerate(series):
                if compare:
                    total = float(np.sum(counts))
                    share = counts / total if total else np.zeros(len(counts))
                    text = f"{_short(label)} ({total:,.0f})"
                    if k == 0:
                        ax.stairs(share, edges, fill=True, color=colour, alpha=0.35, zorder=1)
                        ax.stairs(share, edges, color=colour, linewidth=1.8, label=text, zorder=3)
                    else:
                        ax.stairs(share, edges, fill=True, color=colour, label=text, zorder=2)
                    bottom = np.maximum(bottom, share)
                else:
                    top = bottom + counts
                    ax.stairs(top, edges, baseline=bottom, fill=True, color=colour, label=_short(label))
                    bottom = top
            if compare:
                ylabel = "share of the group"
            if draw_title:
                ax.set_title(_short(title, 70), loc="left")
            ax.set_xlabel(_short(xlabel, 60))
            ax.set_ylabel(ylabel)
            ax.set_xlim(edges[0], edges[-1])
            _integer_ticks(ax, edges)
            ax.set_ylim(0, max(float(bottom.max()), 1e-9 if compare else 1.0) * 1.08)
            if compare:
                from matplotlib.ticker import PercentFormatter

                ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            else:
                _thousands(ax)
            if len(series) > 1:
                ax.legend(
                    loc="lower right",
                    bbox_to_anchor=(1.0, 1.0),
                    ncols=len(series),
                    fontsize=8.5,
                    borderaxespad=0.2,
                    handlelength=1.2,
                )
            self._margins(fig, left=0.7, right=0.15, bottom=0.55, top=0.35)
        return _svg(fig, self._salt(), title)

    def small_histograms(
        self, panels: Sequence[tuple[str, np.ndarray, np.ndarray]], *, title: str, width: float = 6.2
    ) -> str:
        """One small histogram per agent: ``[(agent column, edges, counts), ...]``."""
        matplotlib, plt = _pyplot()
        cols = min(len(panels), 3)
        rows = -(-len(panels) // cols)
        with matplotlib.rc_context(_RC):
            fig, axes = plt.subplots(rows, cols, figsize=(width, 0.35 + 1.75 * rows), squeeze=False)
            for ax in axes.flat[len(panels) :]:
                ax.set_visible(False)
            for ax, (name, edges, counts) in zip(axes.flat, panels, strict=False):
                ax.stairs(counts, edges, fill=True, color=AGENT)
                ax.set_xlim(edges[0], edges[-1])
                _integer_ticks(ax, edges)
                ax.set_title(_short(name, 30), loc="left", fontsize=9, fontweight="normal")
                ax.tick_params(labelsize=7.5)
                ax.locator_params(nbins=4)
                _thousands(ax)
            self._margins(fig, left=0.5, right=0.1, bottom=0.3, top=0.3, wspace=0.45, hspace=0.75)
        return _svg(fig, self._salt(), title)

    def heatmap(
        self,
        matrix: np.ndarray,
        labels: Sequence[str],
        *,
        title: str,
        vmin: float = -1.0,
        vmax: float = 1.0,
    ) -> str:
        """Annotated square matrix (NaN cells blank), diverging colours centred on 0."""
        matplotlib, plt = _pyplot()
        n = matrix.shape[0]
        names = [_short(s, 22) for s in labels]
        longest = max((len(s) for s in names), default=4)
        cell = 0.55
        left, bottom = 0.25 + 0.068 * longest, 0.25 + 0.045 * longest
        width, height = left + cell * n + 1.0, bottom + cell * n + 0.45
        width = max(width, 0.3 + 0.09 * len(_short(title, 48)))  # room for the title
        with matplotlib.rc_context(_RC):
            fig, ax = plt.subplots(figsize=(max(width, 3.2), height))
            masked = np.ma.masked_invalid(matrix)
            cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#f1f3f6")
            image = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            ax.set_xticks(range(n), names, rotation=30, ha="right", rotation_mode="anchor")
            ax.set_yticks(range(n), names)
            ax.spines[:].set_visible(False)
            ax.tick_params(length=0)
            for i in range(n):
                for j in range(n):
                    value = matrix[i, j]
                    if np.isfinite(value):
                        strong = abs(value) > 0.6 * max(abs(vmin), abs(vmax))
                        ax.text(
                            j,
                            i,
                            f"{value:.2f}",
                            ha="center",
                            va="center",
                            fontsize=8.5,
                            color="white" if strong else INK,
                        )
            fig.suptitle(
                _short(title, 48),
                x=0.1 / max(width, 3.2),
                ha="left",
                y=1 - 0.08 / height,
                va="top",
                fontsize=_RC["axes.titlesize"],
                fontweight="bold",
                color=INK,
            )
            self._margins(fig, left=left, right=max(width, 3.2) - left - cell * n, bottom=bottom, top=0.45)
            box = ax.get_position()
            bar = fig.add_axes(
                (
                    box.x1 + 0.15 / fig.get_size_inches()[0],
                    box.y0,
                    0.12 / fig.get_size_inches()[0],
                    box.height,
                )
            )
            fig.colorbar(image, cax=bar)
            bar.tick_params(labelsize=7.5)
        return _svg(fig, self._salt(), title)

    def bars(
        self,
        labels: Sequence[str],
        series: Sequence[tuple[str, np.ndarray, str]],
        *,
        title: str,
        xlabel: str = "samples",
        annotate: bool = True,
        legend: bool = True,
        width: float = 6.2,
        draw_title: bool = True,
    ) -> str:
        """Horizontal stacked bars, one per label, first label on top; totals written at the bar ends."""
        matplotlib, plt = _pyplot()
        n = len(labels)
        names = [_short(s, 30) for s in labels]
        left_margin = 0.2 + 0.068 * max((len(s) for s in names), default=4)
        with matplotlib.rc_context(_RC):
            fig, ax = plt.subplots(figsize=(width, 1.0 + 0.28 * n))
            y = np.arange(n)[::-1]
            left = np.zeros(n)
            for label, counts, colour in series:
                counts = np.asarray(counts, dtype=np.float64)
                ax.barh(y, counts, left=left, color=colour, height=0.66, label=_short(label))
                left = left + counts
            ax.set_yticks(y, names)
            ax.set_ylim(-0.6, n - 0.4)
            ax.set_xlabel(xlabel)
            if draw_title:
                ax.set_title(_short(title, 70), loc="left")
            ax.tick_params(axis="y", length=0)
            span = float(np.max(left)) if n else 1.0
            if annotate:
                for yi, total in zip(y, left, strict=True):
                    ax.text(
                        total + 0.01 * span,
                        yi,
                        f"{total:,.0f}",
                        va="center",
                        ha="left",
                        fontsize=8.5,
                        color=MUTED,
                    )
            ax.set_xlim(0, max(span * 1.16, 1.0))
            if legend and len(series) > 1:
                ax.legend(
                    loc="lower right",
                    bbox_to_anchor=(1.0, 1.0),
                    ncols=len(series),
                    fontsize=8.5,
                    borderaxespad=0.2,
                    handlelength=1.2,
                )
            _thousands(ax, axis="x")
            self._margins(fig, left=left_margin, right=0.15, bottom=0.5, top=0.35)
        return _svg(fig, self._salt(), title)


def _integer_ticks(ax, edges: np.ndarray) -> None:
    """Whole-number ticks for integer-aligned bins (counts, 1-5 ratings)."""
    if len(edges) > 1 and np.allclose(np.diff(edges), 1.0) and np.isclose(edges[0] % 1, 0.5):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))


def _thousands(ax, axis: str = "y") -> None:
    from matplotlib.ticker import FuncFormatter

    def fmt(value: float, _pos: int) -> str:
        if abs(value) >= 1e6:
            return f"{value / 1e6:g}M"
        if abs(value) >= 1e4:
            return f"{value / 1e3:g}k"
        return f"{value:g}"

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(FuncFormatter(fmt))


def bin_edges(values: np.ndarray, bins: int = 40) -> np.ndarray | None:
    """Edges over the finite values: integer-aligned for small integer ranges, else ``bins`` equal bins
    between the 0.1th and 99.9th percentiles (values outside are counted in the edge bins)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if np.all(finite == np.round(finite)) and hi - lo <= 60:
        return np.arange(lo - 0.5, hi + 1.5, 1.0)
    if finite.size > 1000:
        lo, hi = (float(x) for x in np.percentile(finite, [0.1, 99.9]))
    if hi <= lo:
        return np.array([lo - 0.5, lo + 0.5])
    return np.linspace(lo, hi, bins + 1)


def counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram counts over equal-width ``edges``; values beyond them count in the first/last bin."""
    finite = values[np.isfinite(values)]
    bins = len(edges) - 1
    index = np.floor((finite - edges[0]) * (bins / (edges[-1] - edges[0])))
    return np.bincount(np.clip(index, 0, bins - 1).astype(np.int64), minlength=bins)
