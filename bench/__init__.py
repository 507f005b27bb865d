"""Benchmarks (`make bench`): the gateway against a reference server in the same run (DESIGN.md §7)."""
