"""Warehouse names are validated when the config loads, and quoted safely in SQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from sofar_assets.config import ConfigError, parse_config
from sofar_assets.defs.resources import BigQueryWarehouseResource, build_resources
from sofar_assets.lib.warehouse import BigQueryWarehouse

BASE = {
    "tasks": {"dirt": {"table": "labels_dirt", "labels": {"d": "dirt"}}},
    "uploads": {"table": "image_uploads", "allowed_roots": ["gs://sofar-images/uploads"]},
    "partitions": {"start_date": "2026-11-01"},
}


def parse(**changes):
    return parse_config({**BASE, **changes}, base_dir=Path("."), source="sofar.yaml")


def bigquery(**fields):
    return {"warehouse": {"kind": "bigquery", "project": "sofar-prod", "dataset": "sofar", **fields}}


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(storage=bigquery(project="sofar`; DROP TABLE x; --")), "storage.warehouse.project"),
        (dict(storage=bigquery(project="Sofar-Prod")), "storage.warehouse.project"),
        (dict(storage=bigquery(project="abc")), "storage.warehouse.project"),  # too short
        (dict(storage=bigquery(project="sofar-prod-")), "storage.warehouse.project"),
        (dict(storage=bigquery(project="1sofar-prod")), "storage.warehouse.project"),
        (dict(storage=bigquery(dataset="so-far")), "storage.warehouse.dataset"),
        (dict(storage=bigquery(dataset="so`far")), "storage.warehouse.dataset"),
        (dict(storage={"warehouse": {"kind": "duckdb", "schema": "so far"}}), "storage.warehouse.schema"),
        (dict(uploads={"table": "image_uploads; --"}), "uploads.table"),
        (dict(tasks={"dirt": {"table": "labels.dirt", "labels": {"d": "dirt"}}}), "tasks.dirt.table"),
    ],
)
def test_bad_warehouse_names_are_config_errors_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=rf"sofar.yaml: invalid config\n  {key}: .*invalid"):
        parse(**changes)


@pytest.mark.parametrize("project", ["sofar-prod", "example.com:sofar-prod", "a12345", "my-project-123456789012345678"])
def test_gcp_project_ids_are_accepted(project):
    cfg = parse(storage=bigquery(project=project))
    assert cfg.storage.warehouse.project == project
    wh = BigQueryWarehouse(project, "sofar", client=object())
    assert wh.fully_qualified("predictions") == f"`{project}.sofar.predictions`"


def test_warehouse_refuses_names_that_would_escape_its_quotes():
    with pytest.raises(ValueError, match="invalid BigQuery project"):
        BigQueryWarehouse("sofar-prod`.x", "sofar", client=object())
    with pytest.raises(ValueError, match="invalid BigQuery dataset"):
        BigQueryWarehouse("sofar-prod", "sofar`", client=object())


def test_api_endpoint_selects_the_emulator_write_path():
    prod = build_resources(parse(storage=bigquery()))["warehouse"]
    assert isinstance(prod, BigQueryWarehouseResource) and prod.api_endpoint is None
    local = build_resources(parse(storage=bigquery(api_endpoint="http://127.0.0.1:9050")))["warehouse"]
    assert local.api_endpoint == "http://127.0.0.1:9050"
    wh = local.get()  # an anonymous emulator client: no credentials, no network at construction
    assert wh.partition_decorator is False
    assert wh.client._connection.API_BASE_URL == "http://127.0.0.1:9050"
