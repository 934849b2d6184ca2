"""The operator's run folder: its summary, report, audit report, and the models exported from it."""
