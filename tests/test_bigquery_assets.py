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


class _RecordedEmulator:
    """Every call the warehouse makes on its BigQuery client, recorded (as ``RecordingClient`` in
    test_warehouse_api.py does), then answered by the emulator. A production day load into
    ``table$YYYYMMDD`` (WRITE_TRUNCATE) is checked against the REST contract like RecordingClient's
    and applied the way the emulator can (it has no partition decorators): delete the day, append
    its rows; those two emulator calls stand in for the one recorded load and are not counted."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            if name == "load_table_from_file" and "$" in str(args[1]):
                return self._day_load(*args, **kwargs)
            return attr(*args, **kwargs)

        return call

    def _day_load(self, fh, destination, job_config=None, location=None):
        from bq_contract import check_load_job
        from google.cloud import bigquery
        from google.cloud.bigquery.job import LoadJob

        ref = bigquery.TableReference.from_string(destination)
        body = LoadJob("job-1", None, ref, client=self.inner, job_config=job_config).to_api_repr()
        table, day = destination.split("$")
        check_load_job(body, job_location=location, dataset_location=None,
                       table=self.inner.get_table(table).to_api_repr())
        assert job_config.write_disposition == bigquery.WriteDisposition.WRITE_TRUNCATE
        self.inner.query(f"DELETE FROM `{table}` WHERE prediction_date = "
                         f"DATE '{dt.datetime.strptime(day, '%Y%m%d').date()}'").result()
        append = bigquery.LoadJobConfig(source_format=job_config.source_format, schema=job_config.schema,
                                        write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
        return self.inner.load_table_from_file(fh, table, job_config=append, location=location)


def test_a_one_day_production_run_makes_at_most_7_bigquery_calls(pipeline, emulator, demo_data):
    """Per run: table metadata fetched once per warehouse instance, and ONE grouped query for the
    read-back, the review queue's counts and the drift checks (plus the review sheet's LIMIT query)."""
    recorded = _RecordedEmulator(emulator.client())

    class RecordedWarehouse(BigQueryWarehouseResource):
        # production settings (no api_endpoint: partition loads), the client recorded over the emulator
        def client_context(self):
            return contextlib.nullcontext(recorded)

    dataset = f"sofar_{uuid.uuid4().hex[:8]}"
    BigQueryWarehouseResource(project=emulator.project, dataset=dataset,
                              api_endpoint=emulator.url).get().ensure_dataset()
    warehouse = RecordedWarehouse(project=emulator.project, dataset=dataset)
    defs = pipeline["defs"]
    day = DAYS[0]
    tags = {"dagster/asset_partition_range_start": day.isoformat(),
            "dagster/asset_partition_range_end": day.isoformat()}
    for run in range(2):  # the first run creates the table; the second finds it
        recorded.calls.clear()
        result = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
                                resources={**defs.resources, "warehouse": warehouse},
                                instance=pipeline["instance"], tags=tags)
        assert result.success
        print(f"run {run + 1}: {len(recorded.calls)} BigQuery client calls: {recorded.calls}")
        assert len(recorded.calls) <= 7, recorded.calls
        assert recorded.calls.count("get_table") <= 2, recorded.calls  # predictions, label_corrections
        assert recorded.calls.count("load_table_from_file") == 1, recorded.calls
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        assert checks["rows_match_uploads"], checks
    rows = BigQueryWarehouseResource(project=emulator.project, dataset=dataset,
                                     api_endpoint=emulator.url).get().read_table("predictions")
    assert len(rows) == len(list((demo_data / "uploads" / day.isoformat()).iterdir()))
