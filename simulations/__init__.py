"""Everything in one process: the in-process simulation, its baselines, personalization of a finished run, and
the demo datasets."""
