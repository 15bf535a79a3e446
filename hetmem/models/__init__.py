"""Models hetmem ships for its own job, benchmarks and tests."""
