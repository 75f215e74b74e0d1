"""Moved to ``ipiqa.runtime.results``; this name stays only until ``ipiqa/cli.py`` imports the commands from there."""
