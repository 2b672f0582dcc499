"""The artifact store: every path a URI opened through fsspec (storage), the run's parquet and
DuckDB tables (tables), runs published whole (publish, visibility), and what reads them back
(verify, catalog) or cleans after them (gc).

May import: expertbits.tasks.errors, .records.
"""
