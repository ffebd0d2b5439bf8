"""Throughput benchmarks for weightstream and the peer baselines it is measured against."""
