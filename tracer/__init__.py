"""Warm-up memory tracer: a clock of moments, a store of what was measured, budget policy."""
