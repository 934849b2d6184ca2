"""Benchmarks: scripts that print a table and write JSON to results/ (not part of the installed package)."""
