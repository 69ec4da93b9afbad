"""Writes under concurrency and under SIGKILL: separate processes write days of one table at
the same time, and a write killed at each phase leaves the old day or the new one, never a mix."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from test_warehouse_api import rows

from sofar_assets.lib.warehouse import (
    PREDICTIONS,
    STAGING_PREFIX,
    BigQueryWarehouse,
    DuckDBWarehouse,
    ParquetSpool,
)

REPO = Path(__file__).resolve().parents[1]
DAYS = [dt.date(2026, 11, d) for d in (1, 2, 3, 4)]
D1, D2 = DAYS[0], DAYS[1]

# The child process: builds the warehouse from argv, and with PHASE set, stops at that phase
# boundary (base.checkpoint is the test seam) and says so on stdout, to be killed there.
CHILD = textwrap.dedent("""
    import datetime as dt, json, os, sys, time
    from sofar_assets.lib.warehouse import base, PREDICTIONS, BigQueryWarehouse, DuckDBWarehouse
    from sofar_assets.lib.warehouse.bigquery import emulator_client

    def stop(phase):
        if phase == os.environ.get("PHASE"):
            print("AT " + phase, flush=True)
            time.sleep(600)

    base.checkpoint = stop
    spec, day, files = json.loads(sys.argv[1]), dt.date.fromisoformat(sys.argv[2]), sys.argv[3:]
    if spec["kind"] == "duckdb":
        wh = DuckDBWarehouse(spec["path"], lock_timeout_s=spec.get("lock_timeout_s", 120))
    else:
        client = emulator_client(spec["project"], spec["url"])
        wh = BigQueryWarehouse(spec["project"], spec["dataset"], client=client, partition_decorator=False)
    print("ROWS", wh.replace_day(PREDICTIONS, day, files), flush=True)
""")


def child(spec: dict, day: dt.date, files: list[str], phase: str | None = None) -> subprocess.Popen:
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if phase:
        env["PHASE"] = phase
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec), day.isoformat(), *files],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def spool(tmp_path: Path, day: dt.date, ids: list[str]) -> str:
    path = tmp_path / f"{day}-{uuid.uuid4().hex[:6]}.parquet"
    with ParquetSpool(PREDICTIONS, path) as s:
        s.append(rows(day, ids))
    return str(path)


@pytest.fixture(params=["duckdb", pytest.param("bigquery", marks=pytest.mark.bigquery)])
def target(request, tmp_path):
    """(warehouse in this process, spec for the children)."""
    if request.param == "duckdb":
        path = str(tmp_path / "wh.duckdb")
        return DuckDBWarehouse(path, lock_timeout_s=120), {"kind": "duckdb", "path": path}
    emulator = request.getfixturevalue("emulator")
    dataset = f"sofar_{uuid.uuid4().hex[:8]}"
    wh = BigQueryWarehouse(emulator.project, dataset, client=emulator.client(),
                           partition_decorator=False)
    wh.ensure_dataset()
    return wh, {"kind": "bigquery", "project": emulator.project, "dataset": dataset, "url": emulator.url}


def test_four_processes_write_four_days_at_once(target, tmp_path):
    wh, spec = target
    sizes = {day: 3 + i for i, day in enumerate(DAYS)}
    files = {day: spool(tmp_path, day, [f"{day:%d}-{j}" for j in range(n)]) for day, n in sizes.items()}
    procs = [child(spec, day, [files[day]]) for day in DAYS]  # all four start before any finishes
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert out.startswith("ROWS ")
    counts = wh.count_by("predictions", "prediction_date", DAYS[0], DAYS[-1] + dt.timedelta(days=1),
                         ["prediction_date"])
    assert dict(zip(counts["prediction_date"], counts["n"], strict=True)) == sizes
    by_day = wh.read_table("predictions").groupby("prediction_date")["image_id"].apply(sorted).to_dict()
    assert by_day == {day: sorted(f"{day:%d}-{j}" for j in range(n)) for day, n in sizes.items()}


def kill_at(spec, day, files, phase) -> None:
    p = child(spec, day, files, phase)
    try:
        line = p.stdout.readline()
        assert line.strip() == f"AT {phase}", (f"child never reached {phase}: "
                                               f"{line!r} {p.stderr.read()[-3000:]}")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()
        p.stderr.close()


@pytest.mark.parametrize(
    "phase, outcome",
    [
        ("duckdb:begun", "old"), ("duckdb:deleted", "old"),
        ("duckdb:inserted", "old"), ("duckdb:committed", "new"),
    ],
)
def test_duckdb_write_killed_at_each_phase_leaves_old_or_new_day(tmp_path, phase, outcome):
    path = str(tmp_path / "wh.duckdb")
    wh = DuckDBWarehouse(path)
    wh.replace_day(PREDICTIONS, D1, [spool(tmp_path, D1, ["old-a", "old-b"])])
    wh.replace_day(PREDICTIONS, D2, [spool(tmp_path, D2, ["other"])])
    kill_at({"kind": "duckdb", "path": path}, D1, [spool(tmp_path, D1, ["new-x", "new-y", "new-z"])], phase)
    day1 = sorted(wh.read_range("predictions", "prediction_date", D1, D2)["image_id"])
    assert day1 == (["old-a", "old-b"] if outcome == "old" else ["new-x", "new-y", "new-z"])
    assert wh.read_range("predictions", "prediction_date", D2,
                         D2 + dt.timedelta(days=1))["image_id"].tolist() == ["other"]
    # and the file is healthy: the next write goes through
    assert wh.replace_day(PREDICTIONS, D1, [spool(tmp_path, D1, ["next"])]) == 1


@pytest.mark.bigquery
@pytest.mark.parametrize("phase", ["bigquery:staged", "bigquery:script_sent"])
def test_emulator_write_killed_leaves_old_or_new_day_and_the_next_write_cleans_up(emulator, tmp_path, phase):
    dataset = f"sofar_{uuid.uuid4().hex[:8]}"
    client = emulator.client()
    wh = BigQueryWarehouse(emulator.project, dataset, client=client, partition_decorator=False)
    wh.ensure_dataset()
    old, new = ["old-a", "old-b"], ["new-x", "new-y", "new-z"]
    wh.replace_day(PREDICTIONS, D1, [spool(tmp_path, D1, old)])
    spec = {"kind": "bigquery", "project": emulator.project, "dataset": dataset, "url": emulator.url}
    kill_at(spec, D1, [spool(tmp_path, D1, new)], phase)

    day1 = sorted(wh.read_range("predictions", "prediction_date", D1, D2)["image_id"])
    assert day1 in (old, new), day1  # never a mix
    if phase == "bigquery:staged":
        assert day1 == old  # the transaction never started
    leftovers = [t.table_id for t in client.list_tables(f"{emulator.project}.{dataset}")
                 if t.table_id.startswith(STAGING_PREFIX)]
    assert len(leftovers) == 1 and leftovers[0].startswith(f"{STAGING_PREFIX}predictions_20261101_")

    # a young leftover may belong to a running write: kept; once past the TTL, the next write drops it
    wh.replace_day(PREDICTIONS, D2, [spool(tmp_path, D2, ["d2"])])
    assert leftovers[0] in [t.table_id for t in client.list_tables(f"{emulator.project}.{dataset}")]
    later = BigQueryWarehouse(emulator.project, dataset, client=client, partition_decorator=False,
                              staging_ttl=dt.timedelta(0))
    later.replace_day(PREDICTIONS, D2, [spool(tmp_path, D2, ["d2"])])
    assert [t.table_id for t in client.list_tables(f"{emulator.project}.{dataset}")] == ["predictions"]
    assert wh.count_range("predictions", "prediction_date", D1, D2) == len(day1)


def test_a_paused_duckdb_read_does_not_block_another_process(tmp_path):
    path = str(tmp_path / "wh.duckdb")
    wh = DuckDBWarehouse(path)
    wh.replace_day(PREDICTIONS, D1, [spool(tmp_path, D1, [f"a{i}" for i in range(5)])])
    pages = wh.iter_range("predictions", "prediction_date", D1, D2, batch_rows=2)
    assert len(next(pages)) == 2  # paused mid-read, as during a long inference
    p = child({"kind": "duckdb", "path": path, "lock_timeout_s": 5}, D2, [spool(tmp_path, D2, ["b"])])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert [len(b) for b in pages] == [2, 1]
    assert wh.count_range("predictions", "prediction_date", D2, D2 + dt.timedelta(days=1)) == 1
