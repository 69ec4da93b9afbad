"""Resources: the same asset code runs locally and in production; only their targets differ.

=================  ===============================  ==================================
resource           local (config/demo.yaml)          production (config/prod.yaml)
=================  ===============================  ==================================
warehouse          DuckDB file                       BigQuery dataset (dagster-gcp client)
mlflow             sqlite registry + local folder    MLflow tracking server
image_store        local folders + local cache       gs:// buckets + node-local cache
io_manager         small JSON files on disk          small JSON objects on gs://
=================  ===============================  ==================================
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr

from sofar_assets.config import BigQueryTarget, SofarConfig
from sofar_assets.defs.io import JsonIOManager
from sofar_assets.lib import storage
from sofar_assets.lib.images import PreprocessCache
from sofar_assets.lib.warehouse import BigQueryWarehouse, DuckDBWarehouse, Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """Base of the warehouse targets; assets annotate ``warehouse: WarehouseResource``."""

    def get(self) -> Warehouse:
        raise NotImplementedError


class DuckDBWarehouseResource(WarehouseResource):
    """The local warehouse: one DuckDB file (one writer at a time; runs execute in process)."""

    path: str
    schema_name: str = "sofar"

    def get(self) -> Warehouse:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return DuckDBWarehouse(self.path, schema=self.schema_name)


class BigQueryWarehouseResource(WarehouseResource):
    """The production warehouse: a BigQuery dataset.

    The client comes from dagster-gcp's ``BigQueryResource``: application-default credentials,
    or a base64 service-account key in ``gcp_credentials`` (e.g. ``EnvVar("GCP_CREDENTIALS")``).
    It is opened once per run (``setup_for_execution``) and closed after it.
    """

    project: str
    dataset: str
    location: str | None = None
    gcp_credentials: str | None = Field(None, description="base64 service-account key; default: ADC")
    api_endpoint: str | None = Field(
        None, description="a BigQuery emulator's URL (local stack, tests): anonymous client, and days "
        "written by the emulator-only staged transaction instead of partition loads"
    )
    _client: object = PrivateAttr(default=None)
    _stack: ExitStack = PrivateAttr(default_factory=ExitStack)

    def client_context(self):
        if self.api_endpoint is not None:
            from contextlib import nullcontext

            from sofar_assets.lib.warehouse.bigquery import emulator_client

            return nullcontext(emulator_client(self.project, self.api_endpoint, self.location))
        from dagster_gcp import BigQueryResource

        return BigQueryResource(
            project=self.project, location=self.location, gcp_credentials=self.gcp_credentials
        ).get_client()

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._client = self._stack.enter_context(self.client_context())

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._stack.close()
        self._client = None

    def get(self) -> Warehouse:
        if self._client is None:  # used outside a run (CLI summary): open it for the process
            self._client = self._stack.enter_context(self.client_context())
        return BigQueryWarehouse(self.project, self.dataset, location=self.location, client=self._client,
                                 partition_decorator=self.api_endpoint is None)


class MlflowResource(dg.ConfigurableResource):
    """Tracking + model registry. ``setup()`` points the mlflow client at them."""

    tracking_uri: str
    registry_uri: str | None = None
    artifact_location: str = Field(description="where new experiments store artifacts")
    experiment: str = "sofar"

    def setup(self) -> str:
        """Point mlflow at this server/registry and return the experiment id (created if missing)."""
        import mlflow

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = self.artifact_location
        if not storage.is_gcs(location) and "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
        return mlflow.create_experiment(self.experiment, artifact_location=location)

    def client(self):
        from mlflow import MlflowClient

        self.setup()
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)


class ImageStoreResource(dg.ConfigurableResource):
    """Owns the preprocessed-image cache. Bytes are read with ``lib.storage.read_bytes`` (a plain
    function: DataLoader workers started by forkserver/spawn must pickle what they call)."""

    cache_dir: str | None = None

    def cache(self, size: int) -> PreprocessCache:
        return PreprocessCache(self.cache_dir, size)



def build_resources(cfg: SofarConfig) -> dict[str, object]:
    """The resource targets for ``cfg`` — the one seam where the environment is chosen."""
    wh = cfg.storage.warehouse
    if isinstance(wh, BigQueryTarget):
        warehouse: object = BigQueryWarehouseResource(
            project=wh.project, dataset=wh.dataset, location=wh.location, api_endpoint=wh.api_endpoint
        )
    else:
        warehouse = DuckDBWarehouseResource(path=cfg.duckdb_path, schema_name=wh.schema_)
    io_manager = JsonIOManager(base_dir=cfg.io_manager_base)  # a local folder or gs://: JSON, never pickles
    return {
        "warehouse": warehouse,
        "mlflow_tracking": MlflowResource(
            tracking_uri=cfg.mlflow_tracking_uri,
            registry_uri=cfg.storage.mlflow.registry_uri,
            artifact_location=cfg.mlflow_artifact_location,
            experiment=cfg.storage.mlflow.experiment,
        ),
        "image_store": ImageStoreResource(cache_dir=cfg.cache_dir),
        "io_manager": io_manager,
    }
