"""Inspectors' corrections: validated, appended all-or-nothing, and read back as a task source.

A correction is an inspector's verdict on one predicted photo: ``image_id`` (a row of the
``predictions`` table), the ``label`` the photo really shows (a class of the vocabulary, or
``irrelevant`` for a photo that belongs to no class), who said so and when. Verdicts that agree
with the model are recorded too: they are what the real-world accuracy is counted on.

Writers: ``sofar correct`` (one verdict or a CSV), or any other system appending to the
``label_corrections`` table. Both paths are validated:

- ``record`` (the CLI): every row of a batch is checked first — label in the vocabulary or
  ``irrelevant``, ``image_id`` known to the predictions table, a parsable ``corrected_at`` not in
  the future, an inspector — and a batch with any bad row is rejected as a whole, with one line
  per bad row naming the file, the row, the id and the value. Nothing of it is written; rows
  already stored are never touched (the write is one append). Text stored from a file (the
  inspector) is one line with no control characters and no spreadsheet formula prefix.
- Idempotent by content: a verdict whose image, label and inspector equal the image's current
  (latest) verdict adds nothing, with or without ``corrected_at``; nor does a row stored
  exactly before. So re-importing a file, or two imports of it at once, store each verdict
  once, while a changed mind (A, then B, then A again) is kept. The check and the append are
  ONE statement (``Warehouse.append_new``).
- ``latest_per_image`` + ``validate_stored`` (the ``raw_labels/label_corrections`` asset): rows
  another system wrote are checked the same way when the dataset is built; a bad row becomes an
  error row naming why (left out of training, listed by a check), never a crash, never dropped
  silently.

No Dagster here.
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import io
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sofar_assets.lib.common.text import text_problem
from sofar_assets.lib.data import dataset as ds
from sofar_assets.lib.data.dataset import IRRELEVANT
from sofar_assets.lib.data.storage import IMAGE_SUFFIXES
from sofar_assets.lib.data.uploads import refusal
from sofar_assets.lib.warehouse import LABEL_CORRECTIONS, PREDICTIONS, RAW_CORRECTIONS
from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE

TABLE = LABEL_CORRECTIONS.name
TASK = "label_corrections"
"""The task name of the corrections source (asset ``raw_labels/label_corrections``; reserved)."""
INSPECTOR_OOD_SET = "inspector_irrelevant"
"""The OOD set of photos inspectors judged ``irrelevant`` (ood_calibration reports it)."""
CSV_REQUIRED = ("image_id", "label")
CSV_OPTIONAL = ("inspector", "corrected_at")
FUTURE_SLACK = dt.timedelta(minutes=5)
"""A ``corrected_at`` later than now + 5 minutes (clock skew) is a typo: it would win every
later verdict on the same photo under the latest-wins rule."""
MAX_LISTED = 20  # bad rows listed in one rejection message


class CorrectionError(ValueError):
    """A batch of corrections was rejected; nothing of it was written. The message has one
    line per bad row naming the file, the row, the image id and the value."""


@dataclass
class Recorded:
    """What one ``record`` call did."""

    appended: int
    already_stored: int
    by_label: dict[str, int] = field(default_factory=dict)


def allowed_labels(vocabulary: Sequence[str]) -> list[str]:
    return [*vocabulary, IRRELEVANT]


def label_problem(label, vocabulary: Sequence[str]) -> str | None:
    """Why ``label`` is not a verdict (None: it is one)."""
    allowed = allowed_labels(vocabulary)
    if label is None or (isinstance(label, float) and pd.isna(label)) or not str(label).strip():
        return "no label"
    if label in allowed:
        return None
    close = difflib.get_close_matches(str(label), allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"label {label!r} is not a class nor {IRRELEVANT!r}{hint} (allowed: {', '.join(allowed)})"


def parse_time(text: str) -> pd.Timestamp:
    """An ISO 8601 time as naive UTC (a time without an offset is taken as UTC)."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"corrected_at {text!r} is not an ISO 8601 time (e.g. 2026-11-02T09:30:00Z)") from None
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC).replace(tzinfo=None)
    return pd.Timestamp(t)


def now_utc() -> pd.Timestamp:
    return pd.Timestamp(dt.datetime.now(dt.UTC).replace(tzinfo=None))


def read_csv(path: str | Path) -> list[dict]:
    """The rows of a corrections CSV (header ``image_id,label[,inspector][,corrected_at]``), each
    with ``where`` (``FILE row N (line L)``) for messages. A missing or unknown column, or an
    unreadable file, raises :class:`CorrectionError` naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:  # newline="": a CR in a cell stays a CR
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorrectionError(f"{path}: cannot read the corrections file: {exc}; nothing was written") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:  # a header cell over the field limit
        raise CorrectionError(f"{path}: line 1 (header): {exc}; nothing was written") from None
    header = [h.strip() for h in (fieldnames or [])]
    if not header:
        raise CorrectionError(f"{path}: empty file; the first line must be the header "
                              f"{','.join(CSV_REQUIRED)}[,{'][,'.join(CSV_OPTIONAL)}]; nothing was written")
    missing = [c for c in CSV_REQUIRED if c not in header]
    unknown = [c for c in header if c not in (*CSV_REQUIRED, *CSV_OPTIONAL)]
    if missing or unknown:
        parts = [f"missing column(s) {missing}"] if missing else []
        for c in unknown:
            close = difflib.get_close_matches(c, [*CSV_REQUIRED, *CSV_OPTIONAL], n=1)
            parts.append(f"unknown column {c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise CorrectionError(f"{path}: line 1 (header): {'; '.join(parts)}; the columns are "
                              f"{', '.join(CSV_REQUIRED)} and optionally {', '.join(CSV_OPTIONAL)}; "
                              "nothing was written")
    reader.fieldnames = header
    rows = []
    records, n, line = iter(reader), 0, reader.line_num
    while True:
        try:
            record = next(records)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit() (131,072 characters)
            raise CorrectionError(f"{path} row {n + 1} (line {line + 1}): {exc}; nothing was written") from None
        n, line = n + 1, reader.line_num
        if None in record:  # more cells than header columns
            raise CorrectionError(f"{path} row {n} (line {reader.line_num}): more cells than the header's "
                                  f"{len(header)} columns; nothing was written")
        values = {k: (v or "").strip() for k, v in record.items()}
        if not any(values.values()):
            continue  # a blank line
        rows.append({**values, "where": f"{path} row {n} (line {reader.line_num})"})
    return rows


def known_predictions(wh, image_ids: Iterable[str], *, table: str = PREDICTIONS.name, within=None) -> pd.DataFrame:
    """``image_id, image_uri, prediction_date`` of the ids found in the predictions table (the
    latest day when an id was predicted on several): a filter in the warehouse on the ids only.
    ``within=(start, end)`` bounds the days searched (partition pruning)."""
    ids = sorted({str(i) for i in image_ids})
    cols = ["image_id", "image_uri", PREDICTION_DATE]
    if not ids or not wh.table_exists(table):
        return pd.DataFrame(columns=cols)
    found = wh.rows_where_in(table, "image_id", ids, cols,
                             within=None if within is None else (PREDICTION_DATE, *within))
    found = found.sort_values(["image_id", PREDICTION_DATE]).drop_duplicates("image_id", keep="last")
    return found.reset_index(drop=True)


def _reject(problems: list[str], what: str) -> CorrectionError:
    shown = problems[:MAX_LISTED]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return CorrectionError(f"{what} rejected ({len(problems)} bad row(s)); nothing was written:\n  "
                           + "\n  ".join(shown) + more)


def suggest_ids(wh, unknown: Iterable[str], *, table: str = PREDICTIONS.name) -> dict[str, str]:
    """For ids given as a file name (``20261102_007.jpg``, or without its extension), the
    ``image_id`` they most likely mean (``2026-11-02/20261102_007.jpg``): one lookup of the
    file name under each predicted day."""
    names = [i for i in dict.fromkeys(unknown) if i and "/" not in i]
    if not names or not wh.table_exists(table):
        return {}
    days = [pd.Timestamp(d).date().isoformat()
            for d in wh.partition_counts(table, PREDICTION_DATE)["partition"]]
    wanted: dict[str, str] = {}
    for name in names:
        stems = [name] if Path(name).suffix.lower() in IMAGE_SUFFIXES else [name + s for s in sorted(IMAGE_SUFFIXES)]
        wanted |= {f"{day}/{stem}": name for day in days for stem in stems}
    found = known_predictions(wh, wanted, table=table) if wanted else pd.DataFrame(columns=["image_id"])
    out: dict[str, str] = {}
    for image_id in found["image_id"]:  # sorted by id: the earliest day wins a name seen on several
        out.setdefault(wanted[image_id], image_id)
    return out


def validate(rows: list[dict], vocabulary: Sequence[str], known: pd.DataFrame, *, inspector: str,
             now: pd.Timestamp | None = None, what: str = "corrections",
             suggestions: dict[str, str] | None = None) -> pd.DataFrame:
    """The ``label_corrections`` rows of a batch, or :class:`CorrectionError` listing every bad
    row. ``rows`` have ``image_id``, ``label``, optionally ``inspector`` / ``corrected_at`` (text)
    and ``where``; ``known`` is :func:`known_predictions` of their ids."""
    now = now_utc() if now is None else now
    by_id = {r.image_id: r for r in known.itertuples(index=False)}
    problems, out, seen = [], [], {}
    for r in rows:
        where, image_id, label = r.get("where", "row"), r.get("image_id", ""), r.get("label", "")
        if not image_id:
            problems.append(f"{where}: no image_id")
            continue
        head = f"{where}: image_id {image_id!r}"
        why = label_problem(label, vocabulary)
        if why:
            problems.append(f"{head}: {why}")
        pred = by_id.get(image_id)
        if pred is None:
            hint = (suggestions or {}).get(image_id)
            problems.append(f"{head}: unknown image id (not in the predictions table)"
                            + (f"; did you mean {hint!r}?" if hint else ""))
        try:
            at = parse_time(r["corrected_at"]) if r.get("corrected_at") else now
        except ValueError as exc:
            problems.append(f"{head}: {exc}")
            continue
        if at > now + FUTURE_SLACK:
            problems.append(f"{head}: corrected_at {at.isoformat()} is in the future")
        who = r.get("inspector") or inspector
        if not who:
            problems.append(f"{head}: no inspector (add the column or pass --inspector)")
        elif (bad := text_problem(who, formula=True)) is not None:
            column = "column inspector" if r.get("inspector") else "--inspector"
            problems.append(f"{head}: {column} {bad}")
        key = (image_id, at)
        if key in seen and seen[key] != label:
            problems.append(f"{head}: a second verdict at the same corrected_at with another label "
                            f"({seen[key]!r} vs {label!r}); which one wins would be arbitrary")
        seen[key] = label
        if pred is not None and not why:
            out.append({"image_id": image_id, "image_uri": pred.image_uri, "label": label, "inspector": who,
                        "corrected_at": at, PREDICTION_DATE: pd.Timestamp(pred.prediction_date).date()})
    if problems:
        raise _reject(problems, what)
    return pd.DataFrame(out, columns=list(LABEL_CORRECTIONS.columns))


def _new_verdicts_sql(q, staged: str) -> str:
    """The rows of ``staged`` that add something to ``label_corrections``: not stored exactly
    before, and not the image's current verdict again (same label and inspector, whatever its
    ``corrected_at``: two imports at once stamp "now" differently)."""
    cols = list(LABEL_CORRECTIONS.columns)
    image_id, label, inspector, at = (q(c) for c in ("image_id", "label", "inspector", "corrected_at"))
    latest = latest_sql(q, ["image_id", "label", "inspector", "corrected_at"],
                        where=f"{image_id} IN (SELECT {image_id} FROM {staged})")
    return (f"SELECT {', '.join(f's.{q(c)}' for c in cols)} FROM {staged} AS s "
            f"LEFT JOIN ({latest}) AS l ON l.{image_id} = s.{image_id} "
            f"WHERE NOT EXISTS (SELECT 1 FROM {{table:{TABLE}}} AS e WHERE e.{image_id} = s.{image_id} "
            f"AND e.{label} = s.{label} AND e.{inspector} = s.{inspector} AND e.{at} = s.{at}) "
            f"AND (l.{image_id} IS NULL OR l.{label} IS DISTINCT FROM s.{label} "
            f"OR l.{inspector} IS DISTINCT FROM s.{inspector})")


def record(wh, rows: list[dict], vocabulary: Sequence[str], *, inspector: str, now: pd.Timestamp | None = None,
           what: str = "corrections") -> Recorded:
    """Validate a batch and append what it adds in ONE statement (or reject it whole, writing
    nothing). Idempotent by content: importing a file twice, or twice at once, adds nothing the
    second time (see :func:`_new_verdicts_sql`)."""
    ids = [r.get("image_id", "") for r in rows if r.get("image_id")]
    known = known_predictions(wh, ids)
    unknown = set(ids) - set(known["image_id"])
    batch = validate(rows, vocabulary, known, inspector=inspector, now=now, what=what,
                     suggestions=suggest_ids(wh, unknown) if unknown else None)
    batch = batch.drop_duplicates(["image_id", "label", "inspector", "corrected_at"], ignore_index=True)
    appended = wh.append_new(LABEL_CORRECTIONS, batch, lambda staged: _new_verdicts_sql(wh.quote, staged))
    by_label = batch["label"].value_counts().to_dict() if appended == len(batch) else {}
    return Recorded(appended=appended, already_stored=len(rows) - appended, by_label=by_label)


# -- read back: the asset's side -----------------------------------------------------------------
def latest_sql(q, columns: Sequence[str], *, per: Sequence[str] = ("image_id",), where: str = "",
               counted: bool = False, table: str = TABLE) -> str:
    """SQL of the latest verdict per ``per`` (the rule: the latest ``corrected_at`` wins, an exact
    tie goes to the label that sorts last), selecting ``columns`` (quoted by ``q``), filtered by
    ``where`` and, with ``counted``, ``verdicts``: how many rows each ``per`` group has."""
    listed = ", ".join(q(c) for c in columns)
    part = ", ".join(q(c) for c in per)
    count = f", COUNT(*) OVER (PARTITION BY {part}) AS {q('verdicts')}" if counted else ""
    return (f"SELECT {listed}{', ' + q('verdicts') if counted else ''} FROM (SELECT {listed}, "
            f"ROW_NUMBER() OVER (PARTITION BY {part} ORDER BY {q('corrected_at')} DESC, {q('label')} DESC) "
            f"AS {q('rn')}{count} FROM {{table:{table}}}{' WHERE ' + where if where else ''}) AS latest "
            f"WHERE {q('rn')} = 1")


def latest_per_image(wh) -> pd.DataFrame:
    """The latest verdict per ``image_id`` (:func:`latest_sql`) with ``verdicts``, how many rows
    the id has: one window query in the warehouse."""
    cols = list(LABEL_CORRECTIONS.columns)
    if not wh.table_exists(TABLE):
        return pd.DataFrame(columns=[*cols, "verdicts"])
    return wh.query(latest_sql(wh.quote, cols, counted=True) + f" ORDER BY {wh.quote('image_id')}")


def validate_stored(wh, latest: pd.DataFrame, vocabulary: Sequence[str]) -> pd.Series:
    """Per row of :func:`latest_per_image`: why it is rejected (None: valid), checked like
    ``record`` checks a batch — label, a known (image_id, prediction_date), a corrected_at."""
    if latest.empty:
        return pd.Series([], dtype=object)
    dates = pd.to_datetime(latest[PREDICTION_DATE]).dropna()
    within = None if dates.empty else (dates.min().date(), dates.max().date() + dt.timedelta(days=1))
    found = set()
    if within is not None and wh.table_exists(PREDICTIONS.name):
        rows = wh.rows_where_in(PREDICTIONS.name, "image_id", latest["image_id"].dropna(),
                                ["image_id", PREDICTION_DATE], within=(PREDICTION_DATE, *within))
        found = {(i, pd.Timestamp(d).date())
                 for i, d in zip(rows["image_id"], rows[PREDICTION_DATE], strict=True)}
    reasons = []
    for r in latest.itertuples(index=False):
        day = None if pd.isna(r.prediction_date) else pd.Timestamp(r.prediction_date).date()
        if r.image_id is None or pd.isna(r.image_id):
            why = "no image_id"
        elif (why := label_problem(r.label, vocabulary)) is not None:
            why = f"image_id {r.image_id!r}: {why}"
        elif day is None or pd.isna(r.corrected_at):
            why = f"image_id {r.image_id!r}: no {'prediction_date' if day is None else 'corrected_at'}"
        elif (r.image_id, day) not in found:
            why = f"image_id {r.image_id!r}: unknown image id (no prediction on {day})"
        elif not r.image_uri:
            why = f"image_id {r.image_id!r}: no image_uri"
        reasons.append(why)
    return pd.Series(reasons, index=latest.index, dtype=object)


def scan(latest: pd.DataFrame, reasons: pd.Series, vocabulary: Sequence[str],
         inspect: Callable[[str], tuple[str, int, int, int]], roots: Sequence[str], *, threads: int = 2) -> pd.DataFrame:
    """The ``raw_labels_label_corrections`` table: each latest verdict as a raw label row (read,
    hashed and decoded by ``inspect`` like a task's file), or an error row naming the image id and
    why: a rejected verdict (``reasons``), a URI outside the uploads' ``roots`` (never read), or
    an unreadable photo."""
    labels = {label: label for label in allowed_labels(vocabulary)}

    def one(r, why: str | None) -> dict:
        if why is None and (refused := refusal(str(r.image_uri or ""), roots)) is not None:
            why = f"image_id {r.image_id!r}: {refused}; not read"
        if why is not None:
            row = dict.fromkeys(RAW_CORRECTIONS.columns) | {"task": TASK, "image_uri": r.image_uri,
                                                            "source_label": r.label, "error": why}
        else:
            row = ds.scan_row(TASK, r.image_uri, r.label, labels, inspect)
            if row["error"] is not None:
                row["error"] = f"image_id {r.image_id!r}: {row['error']}"
        return row | {"image_id": r.image_id, "inspector": r.inspector, "corrected_at": r.corrected_at,
                      PREDICTION_DATE: r.prediction_date}

    with ThreadPoolExecutor(threads) as pool:
        rows = list(pool.map(one, latest.itertuples(index=False), list(reasons)))
    df = pd.DataFrame(rows, columns=list(RAW_CORRECTIONS.columns))
    df["corrected_at"] = pd.to_datetime(df["corrected_at"])
    df[PREDICTION_DATE] = [None if pd.isna(d) else pd.Timestamp(d).date() for d in df[PREDICTION_DATE]]
    return df.astype({"n_bytes": "Int64", "width": "Int64", "height": "Int64"})


def irrelevant_uris(raw_corrections: pd.DataFrame | None) -> list[str]:
    """The photos whose winning verdict is ``irrelevant`` (readable ones): an OOD set."""
    verdicts = ds.winning_corrections(raw_corrections)
    return sorted(verdicts.loc[verdicts["label"] == IRRELEVANT, "image_uri"])
