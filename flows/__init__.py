"""expertbits.flows."""
