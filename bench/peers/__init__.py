"""Baseline weight-sync peers, one per module. Each exposes ``SENDER``/``RECEIVER`` pieces
driven by :mod:`bench.peers.harness`; none of them is product code."""
