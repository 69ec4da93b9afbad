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

import os
from contextlib import ExitStack
from pathlib import Path

import dagster as dg
from pydantic import Field, PrivateAttr

from sofar_assets.config import BigQueryTarget, SofarConfig
from sofar_assets.defs.io import JsonIOManager
from sofar_assets.lib.common import links
from sofar_assets.lib.data import storage
from sofar_assets.lib.data.images import PreprocessCache
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


class MlflowUnavailable(dg.Failure):
    """The tracking server or registry cannot be used; ONE line naming the URI and what to do."""

    def __init__(self, message: str):
        super().__init__(description=message)


class MlflowResource(dg.ConfigurableResource):
    """Tracking + model registry. ``setup()`` (training: the write path) points the mlflow client
    at them and creates the experiment if missing; ``client()`` (every other step and the CLI)
    never creates anything.

    Both fail fast: a tracking server is probed with one short request before use, and mlflow's
    own HTTP retries are bounded (``http_max_retries``, ``http_timeout_s``) instead of mlflow's
    defaults (7 retries with exponential backoff, 120 s per request: minutes before an error).
    A sqlite registry that does not exist is an error on the read path, not a new empty file.
    Credentials for a server come from the environment only (``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD``, read by mlflow itself).
    """

    tracking_uri: str
    registry_uri: str | None = None
    artifact_location: str | None = Field(
        None, description="where new experiments store artifacts; None: the tracking server's default "
        "(proxied artifacts with `mlflow server --serve-artifacts`)")
    experiment: str = "sofar"
    probe_timeout_s: float = Field(5.0, gt=0, description="the reachability probe of a tracking server")
    http_max_retries: int = Field(1, ge=0, description="mlflow's retries per request (its default: 7)")
    http_timeout_s: int = Field(15, ge=1, description="mlflow's timeout per request (its default: 120 s)")

    def _check_reachable(self, *, create: bool) -> None:
        import requests

        for uri in dict.fromkeys([self.tracking_uri, self.registry_uri or self.tracking_uri]):
            if uri.startswith(("http://", "https://")):
                try:
                    r = requests.get(f"{uri.rstrip('/')}/health", timeout=self.probe_timeout_s)
                except requests.RequestException as exc:
                    reason = type(exc).__name__
                    raise MlflowUnavailable(
                        f"MLflow tracking server {uri} is not reachable ({reason}, probe timeout "
                        f"{self.probe_timeout_s:g} s): start it or fix storage.mlflow.tracking_uri"
                    ) from None
                if r.status_code >= 500:
                    raise MlflowUnavailable(
                        f"MLflow tracking server {uri} is unhealthy: /health answered {r.status_code}")
            elif uri.startswith("sqlite:///") and not create:
                path = Path(uri[len("sqlite:///") :])
                if not path.is_file():
                    raise MlflowUnavailable(
                        f"MLflow registry {path} does not exist (sqlite, {uri}): run training first "
                        "(make run, or materialize train_and_promote); nothing was created"
                    )

    def _point(self, *, create: bool) -> None:
        import mlflow

        # mlflow reads these per request; bounded here so an outage is an error in seconds
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.http_max_retries)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.http_timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"  # mlflow's 2: 2, 4, 8 s between retries
        self._check_reachable(create=create)
        if create and self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)

    def _sqlite_path(self) -> Path | None:
        uri = self.registry_uri or self.tracking_uri
        return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None

    def require_registry(self, name: str, predicted: dict[str, int]) -> None:
        """A registry that has existed must still be there: with prediction rows from versions of
        ``name`` in the warehouse (``predicted``, see ``registry.predicted_versions``), a missing
        sqlite file or a registry without ``name`` is :class:`MlflowUnavailable` naming it, before
        anything is created. With no such rows, training creates the registry (a first run)."""
        from mlflow.exceptions import MlflowException

        from sofar_assets.lib.serving import registry

        if not predicted:
            return
        path = self._sqlite_path()
        if path is not None and not path.is_file():
            raise MlflowUnavailable(registry.lost_registry_message(f"{path} (missing file)", name, predicted))
        try:
            self.client().get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise MlflowUnavailable(registry.lost_registry_message(self.registry_uri or self.tracking_uri, name,
                                                                   predicted)) from None

    def init_registry(self, name: str) -> bool:
        """``sofar init-registry``: create the registry (and ``name`` in it) explicitly; False
        when ``name`` was already registered (nothing changed)."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.setup()
        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)
        try:
            client.get_registered_model(name)
            return False
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        client.create_registered_model(name, tags={"created_by": "sofar init-registry"})
        return True

    def setup(self) -> str:
        """Point mlflow at this server/registry and return the experiment id (created if missing).
        Training calls :meth:`require_registry` first: a registry is created only on a first run."""
        import mlflow

        self._point(create=True)
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is not None:
            if links.EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag was set at creation
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, links.EXPERIMENT_KIND_TAG,
                                                         links.CLASSIC_ML_KIND)
            return exp.experiment_id
        location = self.artifact_location
        if location is not None and not storage.is_gcs(location) and "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
        # tagged so that MLflow 3 opens it in the classic ML view, not the GenAI one
        return mlflow.create_experiment(self.experiment, artifact_location=location,
                                        tags={links.EXPERIMENT_KIND_TAG: links.CLASSIC_ML_KIND})

    def client(self):
        """A client on the existing tracking store and registry (read path: creates nothing).

        Every call is bounded (``http_timeout_s``, ``http_max_retries``); a server that does not
        answer is :class:`MlflowUnavailable` naming it, not a traceback after minutes."""
        from mlflow import MlflowClient

        self._point(create=False)
        registry = self.registry_uri or self.tracking_uri
        return BoundedClient(MlflowClient(tracking_uri=self.tracking_uri, registry_uri=registry),
                             servers=f"{self.tracking_uri}"
                             + (f" / {registry}" if registry != self.tracking_uri else ""),
                             timeout_s=self.http_timeout_s, retries=self.http_max_retries)


_UNANSWERED = ("timed out", "timeout", "max retries exceeded", "connection aborted", "connection refused",
               "remotedisconnected", "connectionerror")


class BoundedClient:
    """An ``MlflowClient`` whose calls that get no answer from the server raise
    :class:`MlflowUnavailable` with one line naming the server, the call and the bound."""

    def __init__(self, client, *, servers: str, timeout_s: int, retries: int):
        self._client, self._servers, self._timeout_s, self._retries = client, servers, timeout_s, retries

    def __getattr__(self, name: str):
        import functools

        from mlflow.exceptions import MlflowException

        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def bounded(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except MlflowException as exc:
                text = str(exc).lower()
                if "api request to" not in text or not any(m in text for m in _UNANSWERED):
                    raise
                raise MlflowUnavailable(
                    f"MLflow server {self._servers} did not answer {name} (waited {self._timeout_s} s per request, "
                    f"{1 + self._retries} {'try' if self._retries == 0 else 'tries'}; storage.mlflow.http_timeout_s / "
                    "http_max_retries): check the "
                    "server and its database"
                ) from None

        return bounded


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
            http_timeout_s=cfg.storage.mlflow.http_timeout_s,
            http_max_retries=cfg.storage.mlflow.http_max_retries,
        ),
        "image_store": ImageStoreResource(cache_dir=cfg.cache_dir),
        "io_manager": io_manager,
    }
