"""``sofar``: the everyday command line (also ``python -m sofar_assets.cli``).

    sofar validate                      check the config (exit 2 with one block of errors)
    sofar status [--days N] [--json]    the champion, its gate, every day's health up to yesterday
    sofar show DAY [--ood] [--out F]    a day's review sheet (PNG) and the rows on it
    sofar review DAY [--limit N] [--out F]  a day's review queue (OOD, label set not of one label)
    sofar review --serve [DAY]          the review page: judge the queue in a browser (127.0.0.1)
    sofar versions [--json]             every model version: gate, dataset hash, champion history
    sofar backfill START END [--local]  predict a range of days (submitted as the Dagster UI does)
    sofar retrain [--local]             train_and_promote only (no demo-data regeneration)
    sofar promote VERSION --reason R    move @champion after re-checking the gate (--force skips it)
    sofar rollback --reason R           move @champion back to the previous champion
    sofar add-task NAME FOLDER --labels SRC=label ...   add a task to the config and validate it
    sofar correct IMAGE_ID LABEL | --csv FILE         record inspectors' verdicts (label_corrections)
    sofar demo-data | summary           what `make run` uses
    sofar init-registry                 create the MLflow registry explicitly (never recreated silently)
    sofar export-weights PATH           the image's build step: the backbone weights for model.weights_file

The config is the file ``SOFAR_CONFIG`` names (default config/demo.yaml). Exit codes: 0 ok,
1 the command could not do what was asked (the message says why), 2 the config or the given
corrections are invalid (nothing was written). ``--help`` imports nothing heavy (pandas,
Dagster, MLflow and torch load inside the commands that need them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sofar_assets.settings import REPO_ROOT, config_path

if TYPE_CHECKING:  # the heavy imports (pandas, Dagster, MLflow) wait for a command that needs them
    from sofar_assets.config import SofarConfig

PROMOTION_TAGS = ("promoted_by", "promoted_reason", "promoted_at", "promoted_from", "promoted_via", "promotion_gate")


class CliError(Exception):
    """The command cannot do what was asked; the message says why and what to do (exit 1)."""


# -- shared helpers ----------------------------------------------------------------------------
def _config() -> SofarConfig:
    from sofar_assets.config import load_config

    return load_config(config_path())


def _resources(cfg: SofarConfig) -> dict:
    from sofar_assets.defs.resources import build_resources

    return build_resources(cfg)


def _client(cfg: SofarConfig):
    return _resources(cfg)["mlflow_tracking"].client()


def _predictions_table() -> str:
    from sofar_assets.defs.predictions import PREDICTIONS_TABLE

    return PREDICTIONS_TABLE


def _stored_evaluation(mv) -> dict | None:
    """The ``evaluation.json`` that ``model_evaluation`` logged in the version's run (or None)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not mv.run_id:
        return None
    try:
        return mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/evaluation.json")
    except (MlflowException, OSError):
        return None


def _gate(cfg: SofarConfig, mv) -> dict[str, tuple[bool, dict]] | None:
    """The promotion gate re-checked on the version's stored evaluation (None: never evaluated)."""
    from sofar_assets.lib.model.gate import gate_results

    evaluation = _stored_evaluation(mv)
    return None if evaluation is None else gate_results(evaluation, cfg.gate)


def _gate_text(verdict: dict[str, tuple[bool, dict]] | None) -> str:
    if verdict is None:
        return "not evaluated (no evaluation.json in the version's MLflow run)"
    failed = [k for k, (ok, _) in verdict.items() if not ok]
    head = "passed" if not failed else f"FAILED {', '.join(failed)}"
    return f"{head} ({len(verdict) - len(failed)}/{len(verdict)} checks)"


def _version_url(cfg: SofarConfig, version: str) -> str:
    from sofar_assets.lib.common import links

    return links.mlflow_version_url(cfg.ui.mlflow_url, cfg.model.name, version)


# -- validate ------------------------------------------------------------------------------------
def validate() -> None:
    from sofar_assets.config import load_config

    path = config_path()
    cfg = load_config(path)
    wh = cfg.storage.warehouse
    print(f"{path}: OK")
    print(f"  tasks:    {', '.join(f'{n} ({len(t.labels)} labels)' for n, t in cfg.tasks.items())}")
    print(f"  classes:  {len(cfg.vocabulary())}: {', '.join(cfg.vocabulary())}")
    print(f"  uploads:  {cfg.resolve(cfg.uploads.folder) if cfg.uploads.folder else 'table ' + str(cfg.uploads.table)}")
    print(f"  warehouse: {wh.kind}; MLflow: {cfg.mlflow_tracking_uri}; executor: {cfg.storage.executor}")


# -- status ---------------------------------------------------------------------------------------
def _fmt(value) -> str:
    """A value for a person: floats to 4 significant digits, dicts as ``k=v``, lists bracketed."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        inner = ", ".join(f"{k}={_fmt(v) if not isinstance(v, dict) else '(' + _fmt(v) + ')'}"
                          for k, v in value.items())
        return inner
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _jsonable(value):
    """``value`` with numpy/pandas scalars, dates and tuples made JSON-friendly, floats rounded."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if value != value else round(value, 6)
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return value


def _print_json(obj) -> None:
    import json

    print(json.dumps(_jsonable(obj), indent=2))


def _partitions_def(cfg: SofarConfig):
    import dagster as dg

    return dg.DailyPartitionsDefinition(start_date=cfg.partitions.start_date.isoformat(),
                                        timezone=cfg.partitions.timezone)


def _dagster_days(cfg: SofarConfig, days: list[dt.date]) -> tuple[set[dt.date] | None, set[dt.date]]:
    """(materialized days, failed days) of ``daily_predictions`` from the Dagster instance at
    ``$DAGSTER_HOME``; (None, set()) when there is none to ask."""
    from sofar_assets.settings import dagster_home

    home = dagster_home()
    if home is None or not home.is_dir():
        return None, set()
    import dagster as dg
    from dagster._core.storage.partition_status_cache import AssetPartitionStatus

    with dg.DagsterInstance.from_config(str(home)) as instance:
        keys = [d.isoformat() for d in days]
        status = instance.get_status_by_partition(dg.AssetKey("daily_predictions"), keys, _partitions_def(cfg)) or {}
    materialized = {dt.date.fromisoformat(k) for k, s in status.items() if s == AssetPartitionStatus.MATERIALIZED}
    failed = {dt.date.fromisoformat(k) for k, s in status.items() if s == AssetPartitionStatus.FAILED}
    return materialized, failed


def _rows_per_day_version(wh, table: str, first: dt.date, last: dt.date) -> dict[dt.date, dict[str, int]]:
    """Rows per day and model version in ``[first, last]``: one GROUP BY in the warehouse."""
    import pandas as pd

    from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE

    if not wh.table_exists(table):
        return {}
    counts = wh.count_by(table, PREDICTION_DATE, first, last + dt.timedelta(days=1),
                         by=[PREDICTION_DATE, "model_version"])
    out: dict[dt.date, dict[str, int]] = {}
    for day, version, n in zip(counts[PREDICTION_DATE], counts["model_version"], counts["n"], strict=True):
        key = "?" if version is None or (isinstance(version, float) and version != version) else str(version)
        out.setdefault(pd.Timestamp(day).date(), {})[key] = int(n)
    return out


def _day_lines(health: list[dict], champion: str | None) -> list[str]:
    """The days as a table; runs of 3+ consecutive missing days collapse into one line."""
    lines = ["  day         state     rows  model"]
    i = 0
    while i < len(health):
        h = health[i]
        j = i
        while j + 1 < len(health) and health[j + 1]["state"] == h["state"] == "missing":
            j += 1
        if j - i >= 2:
            lines.append(f"  {h['day']} .. {health[j]['day']}  missing ({j - i + 1} days)")
            i = j + 1
            continue
        versions = ", ".join(f"v{v}" + (f" ({n})" if len(h["versions"]) > 1 else "") for v, n in h["versions"].items())
        note = f"  (champion is v{champion})" if h["state"] == "stale" else ""
        lines.append(f"  {h['day']}  {h['state']:<8} {h['rows']:>5}  {versions or '-'}{note}")
        i += 1
    return lines


def status(days: int | None, *, until: dt.date | None = None, as_json: bool = False) -> None:
    from sofar_assets.lib.review import health
    from sofar_assets.lib.serving import registry

    cfg = _config()
    res = _resources(cfg)
    client = res["mlflow_tracking"].client()
    report: dict = {"model": cfg.model.name}
    try:
        mv = registry.champion(client, cfg.model.name)
    except registry.NoChampionError as exc:
        mv, report["champion"] = None, None
        report["champion_problem"] = str(exc)
    verdict = None
    if mv is not None:
        tags = dict(mv.tags)
        verdict = _gate(cfg, mv)
        report["champion"] = {"version": str(mv.version), "url": _version_url(cfg, mv.version),
                              **{k: tags[k] for k in PROMOTION_TAGS if k in tags},
                              **{k: tags.get(k) for k in ("test_macro_f1", "test_ece", "ood_threshold",
                                                          "ood_score_method")}}
        report["gate"] = None if verdict is None else {
            name: {"passed": ok, **{k: v for k, v in md.items() if k != "per_set"}}
            for name, (ok, md) in verdict.items()}
    last = until or health.yesterday(cfg.partitions.timezone)
    start = cfg.partitions.start_date
    calendar = health.day_range(start, last, days) if last >= start else []
    champion = None if mv is None else str(mv.version)
    table = _predictions_table()
    wh = res["warehouse"].get()
    counts = _rows_per_day_version(wh, table, calendar[0], calendar[-1]) if calendar else {}
    materialized, failed = _dagster_days(cfg, calendar) if calendar else (None, set())
    per_day = health.day_health(calendar, counts, champion, materialized=materialized, failed=failed)
    tally = {s: sum(h["state"] == s for h in per_day)
             for s in (health.LANDED, health.EMPTY, health.MISSING, health.FAILED, health.STALE)}
    todo = health.backfill_range(per_day)
    stale = health.backfill_range(per_day, (health.STALE,))
    report.update(timezone=cfg.partitions.timezone, days=per_day, counts=tally,
                  dagster_instance=materialized is not None,
                  backfill=None if todo is None else f"sofar backfill {todo[0]} {todo[1]}",
                  rescore_stale=None if stale is None else f"sofar backfill {stale[0]} {stale[1]}")
    if as_json:
        _print_json(report)
        return
    if mv is None:
        print(f"champion:  none ({report['champion_problem']})")
    else:
        tags = dict(mv.tags)
        print(f"champion:  models:/{cfg.model.name}/{mv.version} (@{registry.CHAMPION})  "
              f"{_version_url(cfg, mv.version)}")
        if "promoted_by" in tags:
            print(f"  moved by {tags['promoted_by']} at {tags.get('promoted_at', '?')} "
                  f"({tags.get('promoted_via', '?')}): {tags.get('promoted_reason', '')}")
        print(f"  test macro-F1 {_fmt_tag(tags, 'test_macro_f1')}, ECE {_fmt_tag(tags, 'test_ece')}, "
              f"OOD threshold {_fmt_tag(tags, 'ood_threshold')} ({tags.get('ood_score_method', '?')})")
        print(f"gate:      {_gate_text(verdict)}")
        for name, (ok, md) in (verdict or {}).items():
            print(f"  {'ok  ' if ok else 'FAIL'} {name}: {_fmt({k: v for k, v in md.items() if k != 'per_set'})}")
    if not calendar:
        print(f"days:      none yet: partitions start on {start} (the last complete day is {last})")
        return
    print(f"days:      {calendar[0]} .. {calendar[-1]} ({cfg.partitions.timezone}): "
          + ", ".join(f"{n} {s}" for s, n in tally.items()))
    if materialized is None:
        print("  (no Dagster instance: set DAGSTER_HOME to tell empty days from missing ones)")
    print("\n".join(_day_lines(per_day, champion)))
    if todo is not None:
        print(f"backfill the missing/failed days: {report['backfill']}")
    if stale is not None:
        print(f"re-score the stale days with v{champion}: {report['rescore_stale']}")


def _fmt_tag(tags: dict, key: str) -> str:
    try:
        return f"{float(tags[key]):.4g}"
    except (KeyError, ValueError, TypeError):
        return tags.get(key) or "?"


# -- show -----------------------------------------------------------------------------------------
def _no_rows(cfg: SofarConfig, table: str, day: dt.date) -> str:
    """Why ``day`` has no rows, from what Dagster recorded: materialized empty, failed, or never run."""
    materialized, failed = _dagster_days(cfg, [day])
    if day in failed:
        return (f"no rows for {day} in '{table}': its last run of daily_predictions failed (see the run in the "
                f"Dagster UI), re-run it with `sofar backfill {day} {day}`")
    if materialized is not None and day in materialized:
        return f"{day} was materialized with no uploads: 0 rows in '{table}', nothing to show"
    return (f"no rows for {day} in '{table}': materialize that partition of daily_predictions "
            f"(`sofar backfill {day} {day}`)")


def _champion_note(cfg: SofarConfig, versions: list[str]) -> str:
    """'' when the day was scored by the champion, else a line saying which version scored it."""
    from sofar_assets.lib.serving import registry

    champion = registry.champion_version(_client(cfg), cfg.model.name)
    if champion is None or all(v == str(champion) for v in versions):
        return ""
    return (f"stale: scored by v{', v'.join(versions)}, the champion is now v{champion} "
            "(re-score the day with `sofar backfill DAY DAY`)")


def show(day: dt.date, *, ood_only: bool, out: Path | None, least_confident: int, as_json: bool = False) -> None:
    from sofar_assets.lib.common.names import shown
    from sofar_assets.lib.data import storage
    from sofar_assets.lib.review import health
    from sofar_assets.lib.review.queue import (
        review_candidates,
        review_sheet_png,
        rows_text,
        select_for_review,
    )
    from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE

    cfg = _config()
    wh = _resources(cfg)["warehouse"].get()
    table = _predictions_table()
    if not wh.table_exists(table):
        raise CliError(f"no table '{table}' yet: materialize daily_predictions first")
    nxt = day + dt.timedelta(days=1)
    counts = wh.count_by(table, PREDICTION_DATE, day, nxt, by=["model_version", "is_ood"])
    if counts.empty:
        message = _no_rows(cfg, table, day)
        if "nothing to show" in message:  # not an error: the day landed, with nothing in it
            print(message)
            return
        raise CliError(message)
    scored = wh.count_by(table, PREDICTION_DATE, day, nxt, by=["is_ood"], where_null=("error",))
    n_scored, n_ood = int(scored["n"].sum()), int(scored.loc[scored["is_ood"].fillna(False).astype(bool), "n"].sum())
    picked = select_for_review(review_candidates(wh, table, day, least_confident=least_confident),
                               least_confident=least_confident, ood_only=ood_only)
    versions = sorted(set(counts["model_version"].dropna().astype(str)), key=health.version_key)
    total = int(counts["n"].sum())
    title = f"{day}: {total} rows, {n_ood} OOD-flagged, {total - n_scored} errors; model v{', '.join(versions)}"
    stale = _champion_note(cfg, versions)
    if out is None:
        root = cfg.root
        name = f"{day.isoformat()}-ood.png" if ood_only else f"{day.isoformat()}.png"
        out = (Path(root) if not storage.is_gcs(root) else Path.cwd()) / "review" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    read = partial(storage.read_bytes, within=cfg.upload_roots)  # uploads: under their roots, no links
    out.write_bytes(review_sheet_png(picked, read, title=title))
    errors = wh.query(f"SELECT image_id, error FROM {{table:{table}}} WHERE prediction_date = DATE "
                      f"'{day.isoformat()}' AND error IS NOT NULL ORDER BY image_id LIMIT 50")
    if as_json:
        _print_json({"day": day, "rows": total, "ood_flagged": n_ood, "errors": total - n_scored,
                     "model_versions": versions, "stale": stale or None, "review_sheet": str(out),
                     "picked": picked.to_dict("records"), "error_rows": errors.to_dict("records")})
        return
    print(title)
    if stale:
        print(stale.replace("DAY DAY", f"{day} {day}"))
    print(rows_text(picked))
    for image_id, error in zip(errors["image_id"], errors["error"], strict=True):
        print(f"error row {shown(image_id)}: {shown(error, 400)}")  # names may hold escape codes
    if total - n_scored > len(errors):
        print(f"... {total - n_scored - len(errors)} more error rows")
    print(f"review sheet: {out}")


# -- review ---------------------------------------------------------------------------------------
def _queue_ready(wh, table: str, day: dt.date, cfg: SofarConfig) -> None:
    from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE
    if not wh.table_exists(table):
        raise CliError(f"no table '{table}' yet: materialize daily_predictions first")
    if "label_set_size" not in wh.table_columns(table):
        raise CliError(f"table '{table}' has no label_set columns yet: they are added by the next write of "
                       "daily_predictions (materialize a day with this version)")
    if wh.count_range(table, PREDICTION_DATE, day, day + dt.timedelta(days=1)) == 0:
        raise CliError(_no_rows(cfg, table, day))


def review_day(day: dt.date, *, limit: int, out: Path | None, as_json: bool = False) -> None:
    from sofar_assets.lib.data import storage
    from sofar_assets.lib.review.queue import (
        QUEUE_ORDER,
        judged_in_queue,
        review_queue,
        review_queue_counts,
        review_sheet_png,
        rows_text,
    )

    cfg = _config()
    wh = _resources(cfg)["warehouse"].get()
    table = _predictions_table()
    _queue_ready(wh, table, day, cfg)
    counts = review_queue_counts(wh, table, day)
    queue = review_queue(wh, table, day, limit=limit)
    judged = judged_in_queue(wh, table, day)
    title = (f"{day}: review queue {sum(counts.values())} ("
             + ", ".join(f"{n} {reason}" for reason, n in counts.items())
             + f"), first {len(queue)}; {judged} already judged")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        read = partial(storage.read_bytes, within=cfg.upload_roots)  # uploads: under their roots, no links
        out.write_bytes(review_sheet_png(queue, read, title=title))
    if as_json:
        _print_json({"day": day, "queue": counts, "judged": judged, "order": QUEUE_ORDER,
                     "rows": queue.to_dict("records"), "review_sheet": None if out is None else str(out)})
        return
    print(title)
    print(f"order: {QUEUE_ORDER}")
    print(rows_text(queue))
    if out is not None:
        print(f"review sheet: {out}")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def review_app(cfg: SofarConfig, day: dt.date | None, *, inspector: str, behind_proxy: bool = False):
    """The review page's Starlette app over the config's warehouse (also what the browser test serves)."""
    from sofar_assets.lib.data import storage
    from sofar_assets.lib.review import health
    from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE
    from sofar_assets.review_app import build_app

    wh = _resources(cfg)["warehouse"].get()
    table = _predictions_table()
    if not wh.table_exists(table):
        raise CliError(f"no table '{table}' yet: materialize daily_predictions first")
    if day is None:
        latest = wh.query(f"SELECT max(prediction_date) AS d FROM {{table:{table}}}")["d"].iloc[0]
        day = health.yesterday(cfg.partitions.timezone) if latest is None or latest != latest else \
            dt.date.fromisoformat(str(latest)[:10])

    def stale_note(d: dt.date) -> str:
        counts = wh.count_by(table, PREDICTION_DATE, d, d + dt.timedelta(days=1), by=["model_version"])
        versions = sorted(set(counts["model_version"].dropna().astype(str)), key=health.version_key)
        return _champion_note(cfg, versions).replace("DAY DAY", f"{d} {d}") if versions else ""

    return build_app(wh, table, cfg.vocabulary(), storage.read_bytes, inspector=inspector, default_day=day,
                     behind_proxy=behind_proxy, stale_note=stale_note)


def serve_review(day: dt.date | None, *, host: str, port: int, behind_proxy: bool, inspector: str) -> None:
    """``sofar review --serve``: the review page on HOST:PORT (loopback unless --i-am-behind-iap)."""
    if not _loopback(host) and not behind_proxy:
        raise CliError(f"refusing to serve on {host}: the review page has no login of its own. Bind 127.0.0.1 "
                       "(the default), or run it behind the cluster's identity-aware proxy and pass "
                       "--i-am-behind-iap")
    import uvicorn

    app = review_app(_config(), day, inspector=inspector, behind_proxy=behind_proxy)
    print(f"review page: http://{host}:{port}/  (inspector {inspector}"
          f"{'; the proxy names the inspector' if behind_proxy else ''}); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


# -- promote / rollback -----------------------------------------------------------------------------
def _move_champion(cfg: SofarConfig, client, version: str, *, reason: str, force: bool, by: str, via: str,
                   rollback: bool = False) -> None:
    """Move @champion after re-checking the gate on what the registry holds (the version's logged
    evaluation, under the gate settings recorded on it at training); the logic is lib.registry's."""
    from mlflow.exceptions import MlflowException

    from sofar_assets.lib.serving import registry

    name = cfg.model.name
    try:
        version = registry.parse_version(version)
        registry.one_line(reason, "--reason")
        registry.one_line(by, "--by")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not reason.strip():
        raise CliError("--reason must say why the champion moves (it is recorded in MLflow)")
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise CliError(f"{name} has no version {version!r} in the registry ({cfg.mlflow_tracking_uri})") from None
    try:
        registry.read_calibration(mv)  # daily_predictions refuses an uncalibrated champion, even forced
    except registry.UncalibratedError as exc:
        raise CliError(str(exc)) from None
    current = registry.champion_version(client, name)
    if current == version:
        raise CliError(f"v{version} is already {name}@{registry.CHAMPION}")
    try:
        verdict, source = registry.registry_gate(client, name, version, cfg.gate)
        gate = f"{_gate_text(verdict)} under {source}"
        failed = [k for k, (ok, _) in verdict.items() if not ok]
    except registry.EvidenceError as exc:
        gate, failed = f"no evidence: {exc}", None
    if failed is None or failed:
        if not force:
            raise CliError(f"v{version} cannot be promoted: gate {gate}. The champion stays "
                           f"v{current}. Use --force to move the alias anyway (recorded as forced).")
        gate = f"forced; {gate}"
    previous = registry.set_champion(client, name, version, rollback=rollback)
    registry.record_promotion(client, cfg.model.name, version, previous, by=by, reason=reason, via=via,
                              gate=gate)
    print(f"{name}@{registry.CHAMPION}: v{previous or '-'} -> v{version} (gate {gate})")
    print(f"recorded in MLflow: {_version_url(cfg, version)}")


def promote(version: str, *, reason: str, force: bool, by: str) -> None:
    cfg = _config()
    _move_champion(cfg, _client(cfg), str(version), reason=reason, force=force, by=by, via="sofar promote")


def rollback(*, reason: str, force: bool, by: str, to: str | None) -> None:
    from sofar_assets.lib.serving import registry

    cfg = _config()
    client = _client(cfg)
    current = registry.champion_version(client, cfg.model.name)
    if current is None:
        raise CliError(f"{cfg.model.name} has no @{registry.CHAMPION}: nothing to roll back")
    target = to or registry.rollback_target(client, cfg.model.name, current)
    if target is None:
        raise CliError(f"no earlier champion of {cfg.model.name} than v{current} to roll back to "
                       "(`sofar rollback --to VERSION` names one)")
    _move_champion(cfg, client, target, reason=reason, force=force, by=by, via="sofar rollback", rollback=True)


def init_registry() -> None:
    """Create the MLflow registry explicitly (training refuses to recreate one the warehouse remembers)."""
    from sofar_assets.lib.serving import registry

    cfg = _config()
    res = _resources(cfg)
    wh = res["warehouse"].get()
    known = registry.predicted_versions(wh, cfg.model.name, table=_predictions_table())
    created = res["mlflow_tracking"].init_registry(cfg.model.name)
    where = cfg.storage.mlflow.registry_uri or cfg.mlflow_tracking_uri
    if not created:
        print(f"{where}: model {cfg.model.name!r} is already registered; nothing changed")
        return
    print(f"{where}: registered model {cfg.model.name!r} created (no versions yet)")
    if known:
        print(f"note: the warehouse holds {sum(known.values())} prediction rows from earlier versions "
              f"({', '.join('v' + v for v in sorted(known, key=lambda v: int(v) if v.isdigit() else 0))}); "
              "this registry's versions restart at 1 and are other models")
    print("next: materialize the training group (train_and_promote)")


# -- versions / backfill / retrain ------------------------------------------------------------------
def _ms_iso(ms) -> str:
    return dt.datetime.fromtimestamp(int(ms) / 1000, dt.UTC).replace(microsecond=0).isoformat() if ms else ""


def versions(*, as_json: bool = False) -> None:
    """Every registered version: its gate verdict, dataset hash, metrics and promotion record."""
    from sofar_assets.lib.review import health
    from sofar_assets.lib.serving import registry

    cfg = _config()
    client = _client(cfg)
    name = cfg.model.name
    found = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: health.version_key(v.version))
    if not found:
        raise CliError(f"{name} has no versions in the registry ({cfg.mlflow_tracking_uri}): run `sofar retrain`")
    champion = registry.champion_version(client, name)
    rows = []
    for mv in found:
        tags, verdict = dict(mv.tags), _gate(cfg, mv)
        rows.append({"version": str(mv.version), "champion": str(mv.version) == champion,
                     "created": _ms_iso(mv.creation_timestamp), "run_id": mv.run_id,
                     "dataset_hash": tags.get("dataset_hash"), "test_macro_f1": tags.get("test_macro_f1"),
                     "test_ece": tags.get("test_ece"), "gate": _gate_text(verdict),
                     "gate_checks": None if verdict is None else {k: ok for k, (ok, _) in verdict.items()},
                     "promotion": {k: tags[k] for k in PROMOTION_TAGS if k in tags} or None,
                     "url": _version_url(cfg, mv.version)})
    desc = client.get_registered_model(name).description or ""
    history = [x.strip()[2:] for x in desc.partition(registry.HISTORY_HEADER)[2].strip().splitlines()
               if x.strip().startswith("- ")]
    if as_json:
        _print_json({"model": name, "champion": champion, "versions": rows, "champion_history": history})
        return
    print(f"{name}: {len(rows)} version(s); champion v{champion or '-'}")
    print("  version  created                    dataset       macro-F1  ECE     gate")
    for r in rows:
        mark = "*" if r["champion"] else " "
        print(f"  {mark}v{r['version']:<6} {r['created']:<26} {(r['dataset_hash'] or '?')[:12]:<13} "
              f"{_fmt_tag(r, 'test_macro_f1'):<9} {_fmt_tag(r, 'test_ece'):<7} {r['gate']}")
    print("  (* = @champion)")
    print("champion history (newest first):")
    print("\n".join(f"  {line}" for line in history) if history else "  (no moves recorded)")


def _dagster_graphql(url: str, query: str, variables: dict) -> dict:
    """POST a query to a running Dagster webserver (what its UI does); one clear line if none answers."""
    import httpx

    try:
        r = httpx.post(f"{url.rstrip('/')}/graphql", json={"query": query, "variables": variables}, timeout=60)
        r.raise_for_status()
        body = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise CliError(f"no Dagster webserver answered at {url} ({type(exc).__name__}): start it (`make ui`) or "
                       "give --dagster-url, or run here with --local") from None
    if body.get("errors"):
        raise CliError(f"Dagster at {url} refused: {body['errors'][0].get('message', body['errors'])}")
    return body["data"]


def _refused(data: dict, field: str, ok: str) -> dict:
    res = data[field]
    if res.get("__typename") != ok:
        raise CliError(f"Dagster refused {field}: {res.get('message') or res.get('__typename')}")
    return res


def _dg_launch(args: list[str]) -> None:
    """Run ``dg launch ARGS`` here (as ``make pipeline`` does), output streaming to the terminal."""
    import subprocess

    logs = REPO_ROOT / "config" / "run_logging.yaml"
    cmd = [str(Path(sys.executable).with_name("dg")), "launch", "-m", "sofar_assets.definitions", *args,
           *(["-c", str(logs)] if logs.is_file() else [])]
    print("running: " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd, check=False).returncode
    if code:
        raise CliError(f"dg launch exited {code}: see the run's log above")


BACKFILL_MUTATION = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  ... on PartitionSetNotFoundError { message } ... on UnauthorizedError { message } } }"""


def backfill(start: dt.date, end: dt.date, *, local: bool, dagster_url: str | None, by: str) -> None:
    """Submit ``daily_predictions`` for START..END as the UI's backfill dialog does (GraphQL
    ``launchPartitionBackfill``: the daemon fans it out by the asset's backfill policy), or run it
    here with ``--local`` (``dg launch --partition-range``, one run)."""
    from sofar_assets.lib.review import health

    cfg = _config()
    if start > end:
        raise CliError(f"the range {start} .. {end} is backwards: START must not be after END")
    first, last = cfg.partitions.start_date, health.yesterday(cfg.partitions.timezone)
    if start < first:
        raise CliError(f"{start} is before partitions.start_date {first}: no such partition")
    if end > last:
        raise CliError(f"{end} is not complete yet in {cfg.partitions.timezone} (the last complete day is {last})")
    days = health.day_range(start, end)
    if local:
        _dg_launch(["--assets", "daily_predictions", "--partition-range", f"{start}...{end}"])
        return
    url = dagster_url or cfg.ui.dagster_url
    params = {"assetSelection": [{"path": ["daily_predictions"]}], "partitionNames": [d.isoformat() for d in days],
              "title": f"sofar backfill {start} {end}", "description": f"submitted by {by} (sofar backfill)"}
    res = _refused(_dagster_graphql(url, BACKFILL_MUTATION, {"p": params}), "launchPartitionBackfill",
                   "LaunchBackfillSuccess")
    per_run = cfg.partitions.backfill_days_per_run
    print(f"backfill {res['backfillId']} of daily_predictions {start} .. {end} ({len(days)} days) submitted to "
          f"{url}: " + ("one run" if per_run is None else f"runs of up to {per_run} days")
          + " (the daemon launches them)")
    print(f"follow it: {url.rstrip('/')}/runs/b/{res['backfillId']}")


JOBS_QUERY = """{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name
  location { name } jobs { name } } } } }"""
LAUNCH_MUTATION = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on InvalidSubsetError { message }
  ... on RunConfigValidationInvalid { errors { message } } } }"""


def retrain(*, local: bool, dagster_url: str | None) -> None:
    """Launch ``train_and_promote`` only (no demo-data regeneration): the gate decides the promotion."""
    cfg = _config()
    if local:
        _dg_launch(["--job", "train_and_promote"])
        return
    url = dagster_url or cfg.ui.dagster_url
    repos = _dagster_graphql(url, JOBS_QUERY, {})["repositoriesOrError"].get("nodes", [])
    where = next(((r["location"]["name"], r["name"]) for r in repos
                  if any(j["name"] == "train_and_promote" for j in r["jobs"])), None)
    if where is None:
        raise CliError(f"the Dagster webserver at {url} has no job train_and_promote loaded")
    params = {"selector": {"repositoryLocationName": where[0], "repositoryName": where[1],
                           "jobName": "train_and_promote"}, "runConfigData": {}}
    res = _refused(_dagster_graphql(url, LAUNCH_MUTATION, {"p": params}), "launchRun", "LaunchRunSuccess")
    print(f"train_and_promote submitted to {url}: run {res['run']['runId']}")
    print(f"follow it: {url.rstrip('/')}/runs/{res['run']['runId']}")


# -- add-task ---------------------------------------------------------------------------------------
def _parse_labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep or not src or not dst:
            raise CliError(f"--labels {pair!r}: write SOURCE=canonical, e.g. 1_SCRATCH=scratch")
        labels[src] = dst
    return labels


def _insert_task_line(text: str, entry: str) -> str | None:
    """``text`` with ``entry`` appended to the block-style ``tasks:`` mapping, comments kept;
    None when the file's layout is not one this can edit in place."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"tasks:\s*(#.*)?$", line)), None)
    if start is None:
        return None
    last_child, indent = None, None
    for i in range(start + 1, len(lines)):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            continue
        lead = len(lines[i]) - len(lines[i].lstrip(" "))
        if lead == 0:
            break
        indent = lead if indent is None else indent
        last_child = i
    if last_child is None:
        return None
    if not lines[last_child].endswith("\n"):
        lines[last_child] += "\n"
    lines.insert(last_child + 1, " " * indent + entry + "\n")
    return "".join(lines)


def add_task(name: str, folder: str, labels: list[str], positive: str | None) -> None:
    import yaml

    from sofar_assets.config import check_folders, parse_config, parse_yaml, read_config_text

    path = config_path()
    text = read_config_text(path)
    data = parse_yaml(text, str(path)) or {}
    if name in (data.get("tasks") or {}):
        raise CliError(f"{path}: task {name!r} already exists; edit it there")
    folder_path = Path(folder).expanduser()
    if not folder.startswith("gs://"):  # config paths are relative to the config file's folder
        folder = os.path.relpath(folder_path.resolve(), path.resolve().parent)
    task = {"folder": folder, "labels": _parse_labels(labels), **({"positive": positive} if positive else {})}
    new = {**data, "tasks": {**(data.get("tasks") or {}), name: task}}
    cfg = parse_config(new, base_dir=path.resolve().parent, source=str(path))  # ConfigError: file untouched
    check_folders(cfg)
    entry = yaml.safe_dump({name: task}, default_flow_style=True, sort_keys=False, width=10_000).strip()
    entry = entry[1:-1] if entry.startswith("{") else entry  # "{name: {...}}" -> "name: {...}"
    edited = _insert_task_line(text, entry)
    if edited is None or yaml.safe_load(edited) != new:
        # not a layout we can edit line by line: rewrite the whole file (PyYAML drops comments)
        edited = yaml.safe_dump(new, sort_keys=False)
        print(f"note: {path} was rewritten by PyYAML; its comments are gone")
    path.write_text(edited)
    print(f"{path}: added task {name!r} ({folder}, labels {task['labels']})")
    print(f"classes now: {', '.join(cfg.vocabulary())}")
    print("next: materialize the training group (`sofar retrain`, or train_and_promote in the UI)")


# -- correct ----------------------------------------------------------------------------------------
def correct(image_id: str | None, label: str | None, csv_file: Path | None, inspector: str) -> None:
    """Record inspectors' verdicts: one (IMAGE_ID LABEL) or a CSV, validated all-or-nothing."""
    from sofar_assets.lib.review import corrections as corr

    if csv_file is not None and (image_id or label):
        raise CliError("give IMAGE_ID LABEL or --csv FILE, not both")
    if csv_file is None and not (image_id and label):
        raise CliError("give IMAGE_ID LABEL (one verdict) or --csv FILE (columns image_id,label[,inspector]"
                       "[,corrected_at])")
    cfg = _config()
    wh = _resources(cfg)["warehouse"].get()
    table = _predictions_table()
    if not wh.table_exists(table):
        raise CliError(f"no table '{table}' yet: there is nothing to correct (materialize daily_predictions)")
    if csv_file is not None:
        rows, what = corr.read_csv(csv_file), f"{csv_file}:"
        if not rows:
            raise CliError(f"{csv_file}: no corrections in the file (only a header)")
    else:
        rows, what = [{"image_id": image_id, "label": label, "where": "command line"}], "correction"
    _warn_judged_before(wh, [r.get("image_id", "") for r in rows if r.get("image_id")])
    done = corr.record(wh, rows, cfg.vocabulary(), inspector=inspector, what=what)
    kinds = ", ".join(f"{n} {lab}" for lab, n in sorted(done.by_label.items()))
    kinds = f" ({kinds})" if kinds else "" if done.appended else " (nothing new)"
    print(f"{done.appended} correction(s) appended to '{corr.TABLE}'{kinds}"
          + (f"; {done.already_stored} already stored, skipped" if done.already_stored else ""))
    print("next: materialize field_accuracy for their days (real-world accuracy), and train_and_promote "
          "to retrain on them (a flipped label is a new sofar_dataset version; the gate decides)")


def _warn_judged_before(wh, image_ids: list[str]) -> None:
    """A note on stderr for each photo that already has a verdict (the latest one wins)."""
    from sofar_assets.lib.review.queue import earlier_verdicts

    earlier = earlier_verdicts(wh, image_ids).drop_duplicates("image_id", keep="last")
    for r in earlier.head(20).itertuples(index=False):
        print(f"note: {r.image_id} was already judged {r.label!r} by {r.inspector} at {r.corrected_at}; "
              "the latest verdict wins", file=sys.stderr)
    if len(earlier) > 20:
        print(f"note: ... and {len(earlier) - 20} more photos judged before", file=sys.stderr)


def _loop_summary(cfg: SofarConfig, wh, champ) -> None:
    """The corrections loop in `sofar summary`: verdicts by kind, real-world figures per day, and
    whether the current sofar_dataset (vs the champion's) includes them."""
    import pandas as pd

    from sofar_assets.lib.data import dataset as ds
    from sofar_assets.lib.review import corrections as corr
    from sofar_assets.lib.review import field_accuracy as fa
    from sofar_assets.lib.warehouse import RAW_CORRECTIONS, SOFAR_DATASET
    from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE

    if not wh.table_exists(corr.TABLE):
        print("corrections: none yet (`sofar correct IMAGE_ID LABEL` or `sofar correct --csv FILE`)")
        return
    days = wh.partition_counts(corr.TABLE, PREDICTION_DATE)
    if days.empty:
        print(f"corrections: '{corr.TABLE}' is empty")
        return
    first, last = (pd.Timestamp(d).date() for d in (days["partition"].min(), days["partition"].max()))
    counts = fa.daily_counts(wh, first, last + dt.timedelta(days=1))
    total = fa.rates(counts[fa.COUNT_COLUMNS].sum(min_count=1).to_dict()) if len(counts) else fa.rates({})
    agree = total["top1_correct"] or 0
    print(f"corrections: {int(days['rows'].sum())} verdict(s) in '{corr.TABLE}'; on scored photos (latest "
          f"verdict each): {agree} agree with top-1, {(total['in_vocabulary'] or 0) - agree} relabel, "
          f"{total['irrelevant'] or 0} irrelevant")
    per_day = fa.per_day(counts, list(counts[PREDICTION_DATE]))
    if per_day:
        def show(x):
            return "n/a" if x is None else f"{x:.2f}"

        print("field accuracy (the champion on the photos inspectors judged; `field_accuracy` asset):")
        print("  day         judged  accuracy  coverage  ood_precision")
        for day, f in per_day.items():
            print(f"  {day}  {f['corrected']:>6}  {show(f['accuracy']):>8}  {show(f['coverage']):>8}  "
                  f"{show(f['ood_precision']):>13}")
    if not wh.table_exists(SOFAR_DATASET.name):
        return
    data = wh.read_table(SOFAR_DATASET.name)
    digest, trained_on = ds.dataset_hash(data), champ.tags.get("dataset_hash", "")
    n_corrected = int(data["corrected_at"].notna().sum()) if "corrected_at" in data else 0
    irrelevant = (len(corr.irrelevant_uris(wh.read_table(RAW_CORRECTIONS.name)))
                  if wh.table_exists(RAW_CORRECTIONS.name) else 0)
    ood_set = (f"the OOD set {corr.INSPECTOR_OOD_SET}" if irrelevant >= cfg.gate.min_ood_images else
               f"an OOD set {corr.INSPECTOR_OOD_SET} from gate.min_ood_images={cfg.gate.min_ood_images} on")
    print(f"dataset:    sofar_dataset {digest[:12]}: {len(data)} photos, {n_corrected} labelled by a correction; "
          f"{irrelevant} judged irrelevant ({ood_set})")
    if digest == trained_on:
        print(f"            the champion v{champ.version} was trained on this version")
    else:
        print(f"            the champion v{champ.version} was trained on {trained_on[:12] or '?'}: retrain with "
              "`sofar retrain` (or train_and_promote in the UI); the gate decides the promotion")


# -- demo-data / summary --------------------------------------------------------------------------
def demo_data(out: Path) -> None:
    from sofar_assets.lib.data.synthetic import demo_corrections, generate_demo_data

    if (out / "SYNTHETIC.md").exists():
        if not (out / "corrections.csv").exists():  # demo data from before the corrections loop
            print(f"demo corrections written to {demo_corrections(out)}")
        print(f"demo data already in {out} (SYNTHETIC; delete the folder to regenerate)")
        return
    counts = generate_demo_data(out)
    print(f"SYNTHETIC demo data written to {out}: {counts}")


def summary() -> None:
    from sofar_assets.lib.common import links
    from sofar_assets.lib.serving import registry
    from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE

    cfg = _config()
    res = _resources(cfg)
    wh = res["warehouse"].get()
    client = res["mlflow_tracking"].client()
    table = _predictions_table()
    if not wh.table_exists(table):
        raise CliError("no predictions table yet: run `make run` first")
    per_day = wh.query(
        f"SELECT prediction_date, count(*) AS rows, count(error) AS error_rows, "
        f"sum(CASE WHEN is_ood THEN 1 ELSE 0 END) AS ood_rows "
        f"FROM {{table:{table}}} GROUP BY prediction_date ORDER BY prediction_date"
    )
    if len(per_day):  # versions compare as numbers ("10" after "9"), not max() over text
        from sofar_assets.lib.review.health import newest

        first, last = (dt.date.fromisoformat(str(d)[:10]) for d in (per_day[PREDICTION_DATE].iloc[0],
                                                                      per_day[PREDICTION_DATE].iloc[-1]))
        by_day = _rows_per_day_version(wh, table, first, last)
        per_day["model_version"] = [newest(by_day.get(dt.date.fromisoformat(str(d)[:10]), {}))
                                    for d in per_day[PREDICTION_DATE]]
    try:
        champ = registry.champion(client, cfg.model.name)
    except registry.NoChampionError as exc:
        raise CliError(str(exc)) from None
    print("\n=== sofar_assets: summary ===")
    print(f"config:     {cfg.source_file}")
    print(f"champion:   models:/{cfg.model.name}/{champ.version}  (alias @champion)  "
          f"test macro-F1 {champ.tags.get('test_macro_f1', '?')}, OOD threshold {float(champ.tags['ood_threshold']):.3f}")
    print(f"warehouse:  {cfg.storage.warehouse.kind} table '{table}'"
          + (f" in {cfg.duckdb_path} (schema {cfg.storage.warehouse.schema_})" if cfg.storage.warehouse.kind == "duckdb" else ""))
    print(per_day.to_string(index=False))
    print(f"OOD rows:   {int(per_day['ood_rows'].sum())} of {int(per_day['rows'].sum())}")
    print(f"review:     sofar show {per_day['prediction_date'].iloc[-1]} --ood   (a day's OOD and least confident photos)")
    print(f"            sofar review {per_day['prediction_date'].iloc[-1]}   (its review queue: OOD, label sets of 0 or 2+)")
    print(f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {cfg.mlflow_tracking_uri}   "
          f"then {_version_url(cfg, champ.version)}")
    _loop_summary(cfg, wh, champ)
    print(f"Dagster UI: make ui   (then open {links.dagster_asset_url(cfg.ui.dagster_url, 'daily_predictions')})")


# -- entry point ----------------------------------------------------------------------------------
def _day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day; write YYYY-MM-DD") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number (1 or more)")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return "unknown"


def serving_sync(namespace: str, deployment: str) -> None:
    """Roll the serving Deployment onto the current @champion (deploy/serving/, run by its CronJob)."""
    import kubernetes

    from sofar_assets.lib.serving import registry
    from sofar_assets.lib.serving.pyfunc import sync_rollout

    cfg = _config()
    client = _client(cfg)
    version = registry.champion_version(client, cfg.model.name)
    if version is None:
        raise CliError(f"no '{registry.CHAMPION}' alias on {cfg.model.name!r}: nothing to serve")
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    previous = sync_rollout(kubernetes.client.AppsV1Api(), namespace, deployment, version)
    if previous is None:
        print(f"{namespace}/{deployment} already serves {cfg.model.name} v{version}")
    else:
        print(f"{namespace}/{deployment}: rolling from v{previous or '?'} to {cfg.model.name} v{version}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sofar", description="Everyday commands for the SOFAR image-recognition pipeline. "
        "The config is the YAML file SOFAR_CONFIG names (default config/demo.yaml).")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    who = _user()
    sub.add_parser("validate", help="check the config; errors as one block, exit 2")
    p = sub.add_parser("status", help="the champion, its gate result and every day's health (landed, empty, "
                       "missing, failed, stale) up to yesterday, with the command that backfills what is missing")
    p.add_argument("--days", type=_positive, help="only the last N days up to yesterday (default: every day "
                   "from partitions.start_date)")
    p.add_argument("--until", type=_day, help="the last day to show (default: yesterday in partitions.timezone)")
    p.add_argument("--json", action="store_true", dest="as_json", help="print JSON")
    p = sub.add_parser("show", help="write a day's review sheet (PNG) and print its rows")
    p.add_argument("day", type=_day, help="the day, YYYY-MM-DD")
    p.add_argument("--ood", action="store_true", help="only the OOD-flagged photos")
    p.add_argument("--out", type=Path, help="PNG file to write (default <storage.root>/review/DAY.png)")
    p.add_argument("--least-confident", type=_count, default=8, help="how many least confident photos (default 8)")
    p.add_argument("--json", action="store_true", dest="as_json", help="print JSON (the sheet is still written)")
    p = sub.add_parser("review", help="print a day's review queue: OOD-flagged photos and those whose label set "
                       "holds none or several labels, most uncertain first")
    p.add_argument("day", type=_day, nargs="?", help="the day, YYYY-MM-DD (with --serve: the day the page "
                   "opens on, default the latest day with rows)")
    p.add_argument("--limit", type=_positive, default=50, help="how many rows of the queue (default 50)")
    p.add_argument("--out", type=Path, help="also draw them as a review sheet in this PNG file")
    p.add_argument("--json", action="store_true", dest="as_json", help="print JSON")
    p.add_argument("--serve", action="store_true", help="serve the review page (judge photos in a browser)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind with --serve (default 127.0.0.1)")
    p.add_argument("--port", type=_positive, default=8765, help="port with --serve (default 8765)")
    p.add_argument("--i-am-behind-iap", action="store_true", dest="behind_proxy",
                   help="allow --host beyond loopback: the page has no login of its own and must sit behind "
                   "the cluster's identity-aware proxy")
    p.add_argument("--inspector", default=who, help=f"who judges on the page (default: {who}; behind the "
                   "proxy its identity header wins)")
    p = sub.add_parser("promote", help="move @champion to VERSION after re-checking the promotion gate")
    p.add_argument("version")
    p.add_argument("--reason", required=True, help="why (recorded in MLflow)")
    p.add_argument("--force", action="store_true", help="move the alias even if the gate fails (recorded)")
    p.add_argument("--by", default=who, help=f"who moves it (default: {who})")
    p = sub.add_parser("rollback", help="move @champion back to the version it replaced")
    p.add_argument("--reason", required=True, help="why (recorded in MLflow)")
    p.add_argument("--force", action="store_true", help="move the alias even if the gate fails (recorded)")
    p.add_argument("--to", help="the version to roll back to (default: the one the champion replaced)")
    p.add_argument("--by", default=who, help=f"who moves it (default: {who})")
    p = sub.add_parser("add-task", help="add a task (an ImageFolder of class folders) to the config")
    p.add_argument("name", help="lower_snake_case task name (becomes asset raw_labels/NAME)")
    p.add_argument("folder", help="the task's folder: FOLDER/<class folder>/<images>")
    p.add_argument("--labels", nargs="+", required=True, metavar="SRC=canonical",
                   help="map each class folder to a canonical label, e.g. 0_NORMAL=normal 1_SCRATCH=scratch")
    p.add_argument("--positive", help="the task's positive label (default: the last one mapped)")
    p = sub.add_parser("correct", help="record inspectors' verdicts: IMAGE_ID LABEL, or --csv FILE "
                       "(validated; a bad row rejects the whole batch)")
    p.add_argument("image_id", nargs="?", help="a predicted photo's image_id (see `sofar show DAY`)")
    p.add_argument("label", nargs="?", help="a class of the vocabulary, or 'irrelevant'")
    p.add_argument("--csv", type=Path, dest="csv_file", metavar="FILE",
                   help="columns image_id,label[,inspector][,corrected_at ISO 8601, default now]")
    p.add_argument("--inspector", default=who, help=f"who judged (default: {who}; a CSV column wins)")
    p = sub.add_parser("demo-data", help="generate the SYNTHETIC demo dataset")
    p.add_argument("--out", type=Path, default=REPO_ROOT / ".sofar" / "demo-data")
    sub.add_parser("summary", help="rows per day, the champion and the OOD count (what `make run` prints)")
    sub.add_parser("init-registry", help="create the MLflow registry explicitly (training never recreates a "
                   "registry the warehouse holds prediction rows from)")
    p = sub.add_parser("doctor", help="preflight of the configured environment: one line per check, OK or "
                       "what to do (warehouse, staging bucket, permissions, MLflow, pools, time zone)")
    p.add_argument("--gpu", action="store_true", help="also run a Kubernetes Job on the GPU node pool: torch "
                   "sees the GPU and runs one forward pass of the champion")
    p.add_argument("--gpu-here", action="store_true", help=argparse.SUPPRESS)  # what that Job runs
    p = sub.add_parser("serving-sync", help="roll the serving Deployment onto the current @champion "
                       "(deploy/serving/; its CronJob runs this every minute)")
    p.add_argument("--namespace", default="sofar-serving")
    p.add_argument("--deployment", default="sofar-serving")
    p = sub.add_parser("versions", help="every model version: gate verdict, dataset hash, champion history")
    p.add_argument("--json", action="store_true", dest="as_json", help="print JSON")
    p = sub.add_parser("backfill", help="predict the days START..END (daily_predictions), submitted to the "
                       "Dagster webserver as its UI does (the daemon fans it out), or --local")
    p.add_argument("start", type=_day, help="first day, YYYY-MM-DD")
    p.add_argument("end", type=_day, help="last day, YYYY-MM-DD (inclusive)")
    p.add_argument("--local", action="store_true", help="run it here with `dg launch --partition-range` instead")
    p.add_argument("--dagster-url", help="the webserver (default: ui.dagster_url of the config)")
    p.add_argument("--by", default=who, help=f"who submits it (default: {who})")
    p = sub.add_parser("retrain", help="launch train_and_promote only (the demo data is not regenerated); "
                       "the gate decides the promotion")
    p.add_argument("--local", action="store_true", help="run it here with `dg launch --job` instead")
    p.add_argument("--dagster-url", help="the webserver (default: ui.dagster_url of the config)")
    p = sub.add_parser("export-weights", help="write the packaged Lite0 ImageNet weights as safetensors "
                       "(the image's build step: model.weights_file)")
    p.add_argument("path", type=Path)
    return parser


def _run(args) -> int | None:
    """Run the sub-command; an exit code when it returns one (``doctor``)."""
    match args.cmd:
        case "validate":
            validate()
        case "status":
            status(args.days, until=args.until, as_json=args.as_json)
        case "show":
            show(args.day, ood_only=args.ood, out=args.out, least_confident=args.least_confident,
                 as_json=args.as_json)
        case "review" if args.serve:
            serve_review(args.day, host=args.host, port=args.port, behind_proxy=args.behind_proxy,
                         inspector=args.inspector)
        case "review":
            if args.day is None:
                raise CliError("give the DAY (YYYY-MM-DD), or --serve for the review page")
            review_day(args.day, limit=args.limit, out=args.out, as_json=args.as_json)
        case "promote":
            promote(args.version, reason=args.reason, force=args.force, by=args.by)
        case "rollback":
            rollback(reason=args.reason, force=args.force, by=args.by, to=args.to)
        case "add-task":
            add_task(args.name, args.folder, args.labels, args.positive)
        case "correct":
            correct(args.image_id, args.label, args.csv_file, args.inspector)
        case "demo-data":
            demo_data(args.out)
        case "summary":
            summary()
        case "versions":
            versions(as_json=args.as_json)
        case "backfill":
            backfill(args.start, args.end, local=args.local, dagster_url=args.dagster_url, by=args.by)
        case "retrain":
            retrain(local=args.local, dagster_url=args.dagster_url)
        case "init-registry":
            init_registry()
        case "doctor":
            from sofar_assets.doctor import main as doctor_main

            return doctor_main(_config(), gpu=args.gpu, gpu_here=args.gpu_here)
        case "serving-sync":
            serving_sync(args.namespace, args.deployment)
        case "export-weights":
            from sofar_assets.lib.model.models import export_offline_weights

            print(f"ImageNet weights written to {export_offline_weights(args.path)}")


def _user_error(cmd: str, exc: Exception) -> int | None:
    """Exit code and one line on stderr for an error a person can fix; None: a bug (re-raised)."""
    from sofar_assets.config import ConfigError
    from sofar_assets.lib.review.corrections import CorrectionError

    if isinstance(exc, ConfigError):
        print(exc, file=sys.stderr)
        return 2
    if isinstance(exc, CorrectionError):
        print(f"sofar {cmd}: {exc}", file=sys.stderr)
        return 2
    from sofar_assets.defs.resources import MlflowUnavailable  # imports Dagster: only on this path

    if isinstance(exc, MlflowUnavailable):
        print(f"sofar {cmd}: {exc.description}", file=sys.stderr)  # one line naming the URI
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow's artifact download bars are noise in a terminal command and in run logs.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        code = _run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # `sofar status | head -5`: the reader left; stop quietly (and keep Python's exit-time
        # flush from raising again on the closed pipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except CliError as exc:
        print(f"sofar {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        code = _user_error(args.cmd, exc)
        if code is None:
            raise
        return code
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
