"""Moved: ``ipiqa.runtime.results.commands`` (kept for ``ipiqa/cli.py``'s import until it names the new place)."""
from ..results.commands import report_cmd, select_cmd

__all__ = ["report_cmd", "select_cmd"]
