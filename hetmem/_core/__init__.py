"""Low-level helpers every layer may use (chunk_manager/, nvme/, tracer/ and the public API):
nothing here imports from the layers above.  See tests/test_layers.py."""
