"""expertbits.tasks."""
