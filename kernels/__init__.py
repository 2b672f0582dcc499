"""expertbits.kernels."""
