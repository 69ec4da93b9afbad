"""A day's predictions at a glance: which rows a person should look at, and a sheet to look at.

:func:`review_queue` is the day's review queue, selected in the warehouse: the scored photos
flagged out-of-distribution, and those whose conformal label set (lib/model/conformal.py) holds
other than one label (none reaches the coverage bar, or several are plausible), most
uncertain first. The ``daily_predictions`` asset draws it on each partition's review sheet;
``sofar review DAY`` prints it and can draw it. :func:`select_for_review` picks the OOD-flagged
and least confident photos (``sofar show DAY``). :func:`review_sheet_png` draws either as a
contact sheet with each photo's top-2 labels, probabilities, label set and OOD score under its
thumbnail. No Dagster import.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from sofar_assets.lib.common.names import shown, shown_frame
from sofar_assets.lib.data.images import decode_image
from sofar_assets.lib.model.plots import _fit_thumb
from sofar_assets.lib.warehouse import LABEL_CORRECTIONS
from sofar_assets.lib.warehouse.predictions import IMAGE_COLUMNS, PREDICTION_DATE

OOD = "ood"
EMPTY_SET = "empty_set"
AMBIGUOUS_SET = "ambiguous_set"
LEAST_CONFIDENT = "least_confident"
SECTION_TITLES = {OOD: "flagged out-of-distribution (lowest OOD score first)",
                  EMPTY_SET: "no label reaches the coverage bar: empty label set (lowest top-1 probability first)",
                  AMBIGUOUS_SET: "several plausible labels: label set of 2+ (lowest top-1 probability first)",
                  LEAST_CONFIDENT: "least confident in-distribution (lowest top-1 probability first)"}
# the prediction table's photo columns (lib/warehouse/predictions.py), scored rows only, and why
QUEUE_COLUMNS = [*(c for c in IMAGE_COLUMNS if c != "error"), "reason"]
REVIEW_COLUMNS = [c for c in QUEUE_COLUMNS if not c.startswith("label_set")]
# the queue, in the warehouse's SQL (DuckDB and BigQuery alike): who is in it, why, in which order
QUEUE_REASON_SQL = (f"CASE WHEN is_ood THEN '{OOD}' WHEN label_set_size = 0 THEN '{EMPTY_SET}' "
                    f"ELSE '{AMBIGUOUS_SET}' END")
QUEUE_WHERE_SQL = "error IS NULL AND (is_ood OR label_set_size <> 1)"
QUEUE_ORDER = ("OOD-flagged first, lowest OOD score first; then the rest by top-1 probability (lowest first), "
               "larger label sets first, then image_uri")
CONFIDENT = 0.995
"""A photo scored at top-1 probability >= this (shown as 1.00) is not "least confident": the
least-confident list stops short rather than being padded with sure photos."""
_QUEUE_ORDER_SQL = ("CASE WHEN is_ood THEN 0 ELSE 1 END, CASE WHEN is_ood THEN ood_score END, top1_prob, "
                    "label_set_size DESC, image_uri")


def _day_where(day) -> str:
    return f"prediction_date = DATE '{day.isoformat()}'"


def _not_judged(wh, day) -> str:
    """SQL condition: the photo has no verdict in ``label_corrections`` yet (DuckDB and BigQuery)."""
    if not wh.table_exists(LABEL_CORRECTIONS.name):
        return "TRUE"
    return (f"image_id NOT IN (SELECT image_id FROM {{table:{LABEL_CORRECTIONS.name}}} "
            f"WHERE {_day_where(day)} AND image_id IS NOT NULL)")


def review_queue(wh, table: str, day, *, limit: int = 50) -> pd.DataFrame:
    """The first ``limit`` rows of ``day``'s review queue, with ``reason`` = ``ood``,
    ``empty_set`` or ``ambiguous_set``: scored rows (no ``error``) that are OOD-flagged or whose
    ``label_set_size`` is not 1, in :data:`QUEUE_ORDER`. One ``LIMIT`` query in the warehouse:
    a day of a million rows is never pulled into memory. Rows of a model without label sets
    (NULL ``label_set_size``) are in it only when OOD-flagged. A photo with a verdict in
    ``label_corrections`` has left the queue."""
    cols = ", ".join(QUEUE_COLUMNS[:-1])
    return wh.query(f"SELECT {cols}, {QUEUE_REASON_SQL} AS reason FROM {{table:{table}}} "
                    f"WHERE {_day_where(day)} AND {QUEUE_WHERE_SQL} AND {_not_judged(wh, day)} "
                    f"ORDER BY {_QUEUE_ORDER_SQL} LIMIT {int(limit)}").reindex(columns=QUEUE_COLUMNS)


def review_queue_counts(wh, table: str, day) -> dict[str, int]:
    """How many of ``day``'s rows are still in its review queue (no verdict yet), per reason
    (counted in the warehouse)."""
    counts = wh.query(f"SELECT {QUEUE_REASON_SQL} AS reason, count(*) AS n FROM {{table:{table}}} "
                      f"WHERE {_day_where(day)} AND {QUEUE_WHERE_SQL} AND {_not_judged(wh, day)} GROUP BY 1")
    got = dict(zip(counts["reason"], counts["n"].astype(int), strict=True)) if len(counts) else {}
    return {r: int(got.get(r, 0)) for r in (OOD, EMPTY_SET, AMBIGUOUS_SET)}


def page_queue(wh, table: str, day, *, limit: int = 200, least_confident: int = 8) -> pd.DataFrame:
    """What the review page shows for ``day``: the review queue (:func:`review_queue`), then up to
    ``least_confident`` of the other scored, in-distribution photos with the lowest top-1
    probability below :data:`CONFIDENT` (``reason`` ``least_confident``); photos with a verdict
    are left out of both. Two ``LIMIT`` queries in the warehouse (DuckDB and BigQuery alike)."""
    queue = review_queue(wh, table, day, limit=limit)
    if least_confident <= 0:
        return queue
    cols = ", ".join(QUEUE_COLUMNS[:-1])
    unsure = wh.query(f"SELECT {cols}, '{LEAST_CONFIDENT}' AS reason FROM {{table:{table}}} "
                      f"WHERE {_day_where(day)} AND error IS NULL AND NOT is_ood AND COALESCE(label_set_size, 1) = 1 "
                      f"AND top1_prob < {CONFIDENT} AND {_not_judged(wh, day)} "
                      f"ORDER BY top1_prob, image_uri LIMIT {int(least_confident)}").reindex(columns=QUEUE_COLUMNS)
    parts = [p for p in (queue, unsure) if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else queue


def judged_in_queue(wh, table: str, day) -> int:
    """How many of ``day``'s queue photos (OOD or label set not of one) already have a verdict."""
    n = wh.query(f"SELECT count(*) AS n FROM {{table:{table}}} WHERE {_day_where(day)} AND {QUEUE_WHERE_SQL} "
                 f"AND NOT ({_not_judged(wh, day)})")
    return int(n["n"].iloc[0])


def review_candidates(wh, table: str, day, *, max_ood: int = 24, least_confident: int = 8) -> pd.DataFrame:
    """The day's rows :func:`select_for_review` can pick from, fetched by two ``LIMIT`` queries in
    the warehouse (the lowest OOD scores among flagged rows, the lowest top-1 probabilities among
    the rest), so a day of a million rows is never pulled into memory for its sheet."""
    where = f"{_day_where(day)} AND error IS NULL"
    cols = ", ".join(REVIEW_COLUMNS[:-1] + ["error"])
    parts = [wh.query(f"SELECT {cols} FROM {{table:{table}}} WHERE {where} AND is_ood "
                      f"ORDER BY ood_score, image_uri LIMIT {int(max_ood)}")]
    if least_confident > 0:
        parts.append(wh.query(f"SELECT {cols} FROM {{table:{table}}} WHERE {where} AND NOT is_ood "
                              f"AND top1_prob < {CONFIDENT} ORDER BY top1_prob, image_uri "
                              f"LIMIT {int(least_confident)}"))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=REVIEW_COLUMNS[:-1] + ["error"])


def select_for_review(rows: pd.DataFrame, *, max_ood: int = 24, least_confident: int = 8,
                      ood_only: bool = False) -> pd.DataFrame:
    """The rows worth a look, ``reason`` = ``ood`` or ``least_confident``, in sheet order.

    ``rows`` are one day's rows of the predictions table. OOD-flagged rows come first, most
    irrelevant-looking (lowest OOD score) first, at most ``max_ood``; then the ``least_confident``
    in-distribution rows with the lowest top-1 probability below :data:`CONFIDENT` (none with
    ``ood_only``; fewer when the day has fewer unsure photos). Error rows
    (photos that could not be scored) are not review material: they are listed by their error.
    """
    missing = {"image_uri", "top1_label", "top1_prob", "ood_score", "is_ood"} - set(rows.columns)
    if missing:
        raise ValueError(f"prediction rows lack columns {sorted(missing)}")
    scored = rows[rows["error"].isna()] if "error" in rows.columns else rows
    flagged = scored["is_ood"].fillna(False).astype(bool)
    ood = scored[flagged].sort_values(["ood_score", "image_uri"], kind="stable").head(max_ood)
    parts = [ood.assign(reason=OOD)]
    if not ood_only and least_confident > 0:
        unsure = scored[~flagged & (scored["top1_prob"] < CONFIDENT)]
        unsure = unsure.sort_values(["top1_prob", "image_uri"], kind="stable").head(least_confident)
        parts.append(unsure.assign(reason=LEAST_CONFIDENT))
    out = pd.concat(parts, ignore_index=True)
    return out.reindex(columns=REVIEW_COLUMNS)


def _caption(row) -> list[str]:
    def label(name, prob) -> str:
        if pd.isna(name):  # one-label models and error rows have no top-2
            return "-"
        return f"{name} {float(prob):.2f}"

    flag = "  OOD" if bool(row.get("is_ood")) else ""
    lines = [f"1 {label(row.get('top1_label'), row.get('top1_prob'))}",
             f"2 {label(row.get('top2_label'), row.get('top2_prob'))}"]
    if isinstance(row.get("label_set"), str):
        lines.append(f"set {{{row['label_set'].replace('|', ', ')}}}")
    return [*lines, f"ood score {float(row['ood_score']):.2f}{flag}"]


def _thumbnail(uri: str, read_bytes: Callable[[str], bytes], thumb: int) -> Image.Image | str:
    """The photo fitted into ``thumb`` x ``thumb``, or why it cannot be shown."""
    try:
        img = decode_image(read_bytes(uri), uri, target_size=thumb)
    except Exception as exc:  # a photo deleted or changed since it was scored: say so on the sheet
        return f"{type(exc).__name__}"
    return _fit_thumb(np.asarray(img.convert("RGB")), thumb)


def review_sheet_png(rows: pd.DataFrame, read_bytes: Callable[[str], bytes], *, title: str = "",
                     thumb: int = 128, columns: int = 6, pad: int = 6) -> bytes:
    """Contact sheet of ``rows`` (from :func:`select_for_review` or :func:`review_queue`), one
    section per reason.

    Under each thumbnail: the file name, top-1 and top-2 label with probability, the label set
    (when the rows have one), and the OOD score (``OOD`` when flagged). ``read_bytes(uri)``
    fetches a photo (``lib.storage.read_bytes``); a photo that can no longer be read gets a grey
    cell naming the error.
    """
    font = ImageFont.load_default(size=11)
    head_font = ImageFont.load_default(size=13)
    line_h, cap_lines, head_h = 13, 5, 22
    cell_w, cell_h = thumb + pad, thumb + cap_lines * line_h + pad
    sections = [(r, rows[rows["reason"] == r]) for r in SECTION_TITLES] if len(rows) else []
    sections = [(r, s) for r, s in sections if len(s)]
    cols = max(1, min(columns, max((len(s) for _, s in sections), default=1)))
    width = max(pad + cols * cell_w, 420)
    height = head_h + sum(head_h + -(-len(s) // cols) * cell_h for _, s in sections) + pad
    if not sections:
        height += head_h
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title or "review", fill=(0, 0, 0), font=head_font)
    y = head_h
    if not sections:
        draw.text((pad, y + 4), "nothing to review", fill=(90, 90, 90), font=font)
    for reason, part in sections:
        draw.text((pad, y + 4), f"{SECTION_TITLES[reason]}: {len(part)}", fill=(150, 0, 0) if reason == OOD
                  else (0, 0, 120), font=head_font)
        y += head_h
        for k, (_, row) in enumerate(part.iterrows()):
            x0, y0 = pad + (k % cols) * cell_w, y + (k // cols) * cell_h
            cell = _thumbnail(str(row["image_uri"]), read_bytes, thumb)
            if isinstance(cell, str):
                draw.rectangle([x0, y0, x0 + thumb - 1, y0 + thumb - 1], fill=(200, 200, 200))
                draw.text((x0 + 4, y0 + thumb // 2 - line_h), "unreadable:", fill=(0, 0, 0), font=font)
                draw.text((x0 + 4, y0 + thumb // 2), cell, fill=(0, 0, 0), font=font)
            else:
                sheet.paste(cell, (x0, y0))
            name = shown(str(row["image_uri"]).rsplit("/", 1)[-1])  # one line: a name may hold a newline
            for i, text in enumerate([name, *_caption(row)]):
                while text and draw.textlength(text, font=font) > thumb:
                    text = text[:-2] + "…"
                draw.text((x0, y0 + thumb + 1 + i * line_h), text, fill=(0, 0, 0), font=font)
        y += -(-len(part) // cols) * cell_h
    buf = io.BytesIO()
    # a 256-colour palette keeps thumbnails recognisable at ~40 % of the RGB size (it travels
    # inline in the partition's metadata)
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def rows_text(rows: pd.DataFrame) -> str:
    """The selected rows as a plain table for a terminal (``sofar show``, ``sofar review``)."""
    if rows.empty:
        return "(no rows to review)"
    table = rows.assign(image=rows["image_id"].fillna(rows["image_uri"]))
    if "label_set" in table.columns:  # an empty set is "{}", a missing one "-"
        table["label_set"] = table["label_set"].map(lambda v: "{}" if v == "" else v).fillna("-")
    cols = ["reason", "image", "top1_label", "top1_prob", "top2_label", "top2_prob", "label_set", "ood_score",
            "is_ood"]
    # names escaped: no escape code reaches a terminal, no newline breaks a row
    table = shown_frame(table[[c for c in cols if c in table.columns]], ["image"])
    return table.to_string(
        index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


# -- verdicts from the review page (``sofar review --serve``) ---------------------------------------
def photo_row(wh, table: str, day, image_id: str) -> dict | None:
    """The predictions row of ``image_id`` on ``day`` (None: no such photo that day)."""
    found = wh.rows_where_in(table, "image_id", [image_id], [PREDICTION_DATE, "image_id", "image_uri"])
    found = found[pd.to_datetime(found[PREDICTION_DATE]).dt.date == day]
    return None if found.empty else found.iloc[0].to_dict()


def record_verdict(wh, image_id: str, label: str, vocabulary, *, inspector: str, now=None) -> dict:
    """One inspector's verdict through the same validation and append as ``sofar correct``
    (:func:`lib.corrections.record`). The same verdict (image, label, inspector) given again is
    stored once: the earlier row stays and ``stored`` is False. Returns ``stored``,
    ``corrected_at`` (ISO, what :func:`retract_verdict` needs) and ``earlier`` verdicts on the photo."""
    from sofar_assets.lib.review import corrections as corr

    earlier = earlier_verdicts(wh, [image_id])
    same = earlier[(earlier["label"] == label) & (earlier["inspector"] == inspector)]
    if len(same):
        return {"stored": False, "corrected_at": pd.Timestamp(same["corrected_at"].iloc[-1]).isoformat(),
                "earlier": _verdicts_list(earlier)}
    now = corr.now_utc() if now is None else now
    rows = [{"image_id": image_id, "label": label, "corrected_at": now.isoformat(), "where": "review page"}]
    corr.record(wh, rows, vocabulary, inspector=inspector, now=now, what="verdict")
    return {"stored": True, "corrected_at": now.isoformat(), "earlier": _verdicts_list(earlier)}


def earlier_verdicts(wh, image_ids: list[str]) -> pd.DataFrame:
    """The stored verdicts on ``image_ids`` (oldest first)."""
    cols = ["image_id", "label", "inspector", "corrected_at", PREDICTION_DATE]
    if not wh.table_exists(LABEL_CORRECTIONS.name):
        return pd.DataFrame(columns=cols)
    rows = wh.rows_where_in(LABEL_CORRECTIONS.name, "image_id", list(image_ids), cols)
    return rows.sort_values("corrected_at", kind="stable", ignore_index=True)


def _verdicts_list(rows: pd.DataFrame) -> list[dict]:
    return [{"label": r.label, "inspector": r.inspector, "corrected_at": pd.Timestamp(r.corrected_at).isoformat()}
            for r in rows.itertuples(index=False)]


def retract_verdict(wh, day, image_id: str, *, inspector: str, corrected_at: str) -> int:
    """Undo on the review page: remove the ONE verdict row (``image_id``, ``inspector``,
    ``corrected_at``) the page just appended, by rewriting that day's partition of
    ``label_corrections`` without it (atomic on DuckDB and BigQuery). Returns the rows removed."""
    import datetime as dt

    table = LABEL_CORRECTIONS.name
    if not wh.table_exists(table):
        return 0
    nxt = day + dt.timedelta(days=1)
    rows = wh.read_range(table, PREDICTION_DATE, day, nxt)
    at = pd.Timestamp(corrected_at)
    stamps = pd.to_datetime(rows["corrected_at"], utc=True)
    hit = (rows["image_id"] == image_id) & (rows["inspector"] == inspector) & \
        (stamps == (at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")))
    if not hit.any():
        return 0
    wh.replace_partition(table, rows[~hit].reset_index(drop=True), PREDICTION_DATE, day, nxt)
    return int(hit.sum())
