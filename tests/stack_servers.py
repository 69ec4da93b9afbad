"""Session fixture for the ``stack`` tests: the real servers, started once (sofar_assets/stack).

PostgreSQL (as ``nobody`` when the tests run as root), the GCS emulator with the artifact bucket,
the MLflow tracking server with basic auth over PostgreSQL and artifacts proxied into the
bucket, and a Dagster instance on PostgreSQL (``deploy/prod-local/dagster.yaml``; no daemon).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

ARTIFACT_BUCKET = "sofar-ml"
ARTIFACTS = f"gs://{ARTIFACT_BUCKET}/mlartifacts"


@dataclass
class StackServers:
    stack: object
    pg: object
    gcs: object
    mlflow: object
    dagster: object


@pytest.fixture(scope="session")
def stack_servers():
    from sofar_assets.stack.servers import Dagster, Stack, StackError

    stack = Stack(prefix="sofar-stack-test-")
    try:
        pg = stack.postgres()
        gcs = stack.gcs()
        gcs.create_buckets(ARTIFACT_BUCKET)
        mlflow = stack.mlflow(pg, gcs, ARTIFACTS, workers=1)
        dagster = Dagster(stack, pg)
    except StackError as exc:
        stack.close()
        pytest.fail(f"the stack did not start: {exc}")
    except BaseException:
        stack.close()
        raise
    yield StackServers(stack, pg, gcs, mlflow, dagster)
    leftovers = stack.close()
    assert not leftovers, f"processes outlived the stack: {leftovers}"
    assert not stack.root.exists(), f"{stack.root} was not removed"
