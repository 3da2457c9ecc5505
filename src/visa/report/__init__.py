"""``visa report``: one self-contained HTML page that shows a run to the people who curate the data.

The page holds the run summary (records, unique images, errors by kind with examples, malformed
lines, time per agent), per score a histogram (selected vs not selected when a selection exists),
the agents' Pearson agreement and Shapley weights, the correlations between scores, galleries of the
top, bottom and random images per score with their instruction text, the dropped samples by reason,
and a breakdown by categorical metadata fields. Charts are inline SVG and thumbnails JPEG data URIs;
a Content-Security-Policy forbids every network load and every script, and all record text is
HTML-escaped, so the file opens safely from disk anywhere. Its cost does not grow with the run:
charts aggregate with numpy and galleries show a fixed number of samples.
"""

from visa.report.build import build_report
from visa.report.data import ReportError

__all__ = ["ReportError", "build_report"]
