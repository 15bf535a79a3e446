"""NVMe tier: async file IO, aligned buffers, swap space, and the swap benchmark core."""
