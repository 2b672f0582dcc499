"""The run's tables: parquet written and read through DuckDB (no pyarrow), and the DuckDB schema
every run's database is built from (schema.sql)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import duckdb
import pandas as pd


def schema_sql() -> str:
    return resources.files("expertbits.tasks.store").joinpath("schema.sql").read_text()


def read_parquet(path: Path, order_by: str | None = None) -> pd.DataFrame:
    """A parquet export as a DataFrame, through DuckDB (no pyarrow needed)."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    try:
        sql = "SELECT * FROM read_parquet(?)" + (f" ORDER BY {order_by}" if order_by else "")
        return con.execute(sql, [str(path)]).df()  # the path is a parameter, never SQL text
    finally:
        con.close()


def read_stats(path: Path) -> pd.DataFrame:
    """expert_stats (or any per-expert table) from a parquet export, ordered by (layer, expert)."""
    return read_parquet(path, "layer, expert")


def export_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write a DataFrame as parquet through DuckDB, rows in the frame's order."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    try:
        con.register("frame", frame)
        con.execute("COPY (SELECT * FROM frame) TO ? (FORMAT parquet, PRESERVE_ORDER true)", [str(path)])
    finally:
        con.close()
