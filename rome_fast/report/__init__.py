"""`rome-fast report`: one self-contained, interactive HTML page of trace and eval runs (Plotly
figures, sortable and searchable tables, per-fact heat maps drawn on demand). See docs/report.md."""
from .page import report_data, write_report

__all__ = ["report_data", "write_report"]
