"""Workloads: the service spec, its readers and importers (pure code, no I/O)."""
