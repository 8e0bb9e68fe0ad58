"""Tables and figures of a recipe study run dir: RUN/study_report.md and RUN/figures/*.png."""

from __future__ import annotations

from pathlib import Path


def write_study_report(run: Path, results: dict) -> Path:
    """Write RUN/study_report.md from the finished stages in `results`; returns its path."""
    path = Path(run) / "study_report.md"
    path.write_text("# Recipe study\n\n(report pending)\n")
    return path
