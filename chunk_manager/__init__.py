"""Chunks, tensor and chunk states, the chunk manager, eviction policies and chunk sizing."""
