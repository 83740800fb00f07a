"""Influence benchmarks: jaxunlearn.influence against peer libraries (see influence_bench)."""
