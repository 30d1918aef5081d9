"""Benchmarks: per-model latency (perf.models), perf_analyzer runs (perf/perf_analyzer/)."""
