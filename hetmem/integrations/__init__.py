"""Integrations with other libraries.  Each submodule imports its library; nothing here is
imported by ``import hetmem``.

- ``hetmem.integrations.transformers``: ``HetmemTrainer``, a ``transformers.Trainer`` that
  trains through hetmem (``pip install 'hetmem[hf]'``).
"""
