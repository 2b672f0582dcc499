"""Test environment: set before anything imports torch, triton or prefect."""

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="expertbits-tests-")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CI: threads oversubscribe and slow torch 50x
os.environ["PREFECT_HOME"] = os.path.join(_HOME, "prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_HOME, "prefect", "results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.3"
os.environ["EXPERTBITS_CACHE"] = os.path.join(_HOME, "cache")
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_PROFILE", None)

import torch  # noqa: E402

torch.set_num_threads(1)

# Prefect binds its console log handler to sys.stderr when first imported; imported inside a
# test that captures output (capsys), it would keep writing to that test's closed stream.
from prefect import flow  # noqa: E402, F401  (its import sets Prefect's logging up)

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from expertbits.zoo import text_path  # noqa: E402
from expertbits.zoo.micro import MicroConfig, build_pair  # noqa: E402

TINY = MicroConfig(hidden=32, intermediate=64, layers=2, heads=2, experts=4, top_k=2, vocab=300, seq_len=64, batch=8)


def pytest_collection_modifyitems(items):
    """A flow run end to end is never in the fast loop (`-m "not slow"`)."""
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def micro_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny trained Mixtral pair (base, fine-tuned), built in seconds."""
    out = tmp_path_factory.mktemp("micro")
    return build_pair(out, pretrain_text=text_path("docs-train").read_text()[:120_000],
                      finetune_text=text_path("code-train").read_text()[:120_000], cfg=TINY,
                      pretrain_steps=40, finetune_steps=20, log=None)


@pytest.fixture
def copy_ckpt(tmp_path):
    """Copy a checkpoint folder so a test may damage it."""
    def copy(src: Path, name: str = "ckpt") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible HTTP server on loopback (moto in server mode), as s3fs tests itself."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """(s3fs filesystem, storage_options) with a fresh bucket per test."""
    import uuid

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    options = {"endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.bucket = bucket
    yield fs, options
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture
def params(micro_pair, tmp_path):
    """The flow tests' quantize configuration: the tiny pair at 2.5 bits of {2, 3}, a local store; RTN,
    the fast quantizer (the default, GPTQ, is the no-option run's and tests/flow/test_gptq_flow.py's)."""
    base, ft = micro_pair
    text = tmp_path / "heldout.txt"
    text.write_text(text_path("code-heldout").read_text())
    return dict(checkpoint=str(ft), reference=str(base), avg_bits=2.5, bit_widths=[2, 3], group_size=32, quantizer="rtn",
                store=str(tmp_path / "store"), eval_text=str(text), eval_windows=4, eval_seq_len=64)
