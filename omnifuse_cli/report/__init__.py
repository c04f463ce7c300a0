"""`omnifuse report`: figures (matplotlib, no pyplot state) and one self-contained HTML page from
the files of a run, a cross-validation or a tune folder. Reads result files only; never trains or
predicts."""

from omnifuse_cli.report.page import ReportResult, build_report

__all__ = ["ReportResult", "build_report"]
