"""Reading a finished flow run back: its tasks' final states and artifacts from the Prefect API, and
what a file it wrote says (for the secret scans)."""

import duckdb


def task_states(state, last: str = "publish-run", timeout: float = 60.0) -> dict[str, str]:
    """Final state name of each task of a finished flow run, read back from the Prefect API.

    Task-run states reach the API asynchronously (batched events), so on a loaded machine a read
    right after the flow returns can miss the last tasks or see them without a state: poll until
    `last` is there and every state is final."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            states = {r.name.rsplit("-", 1)[0]: r.state for r in runs}
            if last in states and all(s is not None and s.is_final() for s in states.values()):
                return {name: s.name for name, s in states.items()}
            if time.monotonic() > deadline:
                raise AssertionError(f"task states not final after {timeout:.0f} s: {states}")
            time.sleep(0.2)


def artifacts(state) -> set[tuple[str, str | None]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {(a.type, a.key) for a in found}


def text_of(name: str, data: bytes, tmp) -> str:
    """What a file says, decoded the way its readers decode it (parquet and DuckDB compress strings)."""
    if name.endswith(".parquet"):
        path = tmp / "scan.parquet"
        path.write_bytes(data)
        return duckdb.execute("SELECT * FROM read_parquet(?)", [str(path)]).df().to_csv()
    if name.endswith(".duckdb"):
        path = tmp / "scan.duckdb"
        path.write_bytes(data)
        con = duckdb.connect(str(path), read_only=True)
        try:
            tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
            return "\n".join(con.execute(f'SELECT * FROM "{t}"').df().to_csv() for t in tables)
        finally:
            con.close()
            path.unlink()
    return data.decode("latin-1")


def sha256s(folder) -> dict[str, str]:
    """{file name: sha256} of a folder's files (a quantized folder is flat)."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
