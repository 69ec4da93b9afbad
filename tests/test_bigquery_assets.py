"""daily_predictions writing to BigQuery (the local emulator) through the production resource."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid

import dagster as dg
import pytest

from sofar_assets.defs.resources import BigQueryWarehouseResource

from conftest import DAYS, _assets

pytestmark = pytest.mark.bigquery


def test_daily_predictions_land_in_bigquery_and_reruns_replace_the_day(pipeline, emulator, demo_data):
    class EmulatorWarehouse(BigQueryWarehouseResource):
        # the same resource as production; only the client points at the emulator
        def client_context(self):
            return contextlib.nullcontext(emulator.client())

    dataset = f"sofar_{uuid.uuid4().hex[:8]}"
    # api_endpoint: the emulator-only write path (no partition decorators)
    warehouse = EmulatorWarehouse(project=emulator.project, dataset=dataset, api_endpoint=emulator.url)
    warehouse.get().ensure_dataset()  # runs never create the dataset
    defs = pipeline["defs"]
    resources = {**defs.resources, "warehouse": warehouse}

    def run(start: dt.date, end: dt.date):
        tags = {"dagster/asset_partition_range_start": start.isoformat(),
                "dagster/asset_partition_range_end": end.isoformat()}
        return dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
                              resources=resources, instance=pipeline["instance"], tags=tags)

    assert run(DAYS[0], DAYS[1]).success
    bq = EmulatorWarehouse(project=emulator.project, dataset=dataset, api_endpoint=emulator.url).get()
    first = bq.read_table("predictions")
    uploads = {d: len(list((demo_data / "uploads" / d.isoformat()).iterdir())) for d in DAYS}
    assert first.groupby("prediction_date").size().to_dict() == uploads
    assert bq.table_columns("predictions")["prediction_date"] == "DATE"
    assert run(DAYS[1], DAYS[1]).success  # re-run one day
    again = bq.read_table("predictions")
    assert again.groupby("prediction_date").size().to_dict() == uploads
    assert set(again["image_id"]) == set(first["image_id"])
