"""What the server and the nodes both import: config, keys, data rows, model factory, metrics, seeds, the ledger
format and the residency policy. Imports nothing else of fedlocale (tests/test_layout.py checks it)."""
