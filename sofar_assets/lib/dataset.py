"""Concatenating task-centric datasets into the one SOFAR dataset (pure pandas).

The efficiency-centric idea: N task datasets (defect vs normal, dirt vs normal, ...) become
ONE label space. A label several tasks share (``normal``) is one class; the same photo in two
tasks is one row (deduplicated by the sha256 of its bytes); a photo with different labels in
different tasks is the paper's multi-labelable case and is kept once with all its labels.

Policy for multi-label photos: they stay out of single-label training and validation (cross-
entropy needs one target) and are used to evaluate the top-2 (both labels should be in it).

Splits are a pure function of the content hash, so adding photos never moves existing ones
and a photo can never sit in two splits. Each class gets the split fractions in expectation
(every photo draws its split independently of the others); the ``min_per_class`` asset check
flags a class that came out too small in some split.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Iterable

import pandas as pd

RAW_COLUMNS = ["task", "image_uri", "source_label", "label", "sha256", "n_bytes", "width", "height", "error"]
DATASET_COLUMNS = ["sha256", "image_uri", "label", "labels", "tasks", "multi_label", "split", "n_sources"]
SPLITS = ("train", "val", "test")


def split_for(sha256: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from the content hash: the same bytes always land in the same split."""
    u = int(sha256[:13], 16) / float(16**13)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def scan_row(
    task: str, uri: str, source_label: str, labels: dict[str, str],
    inspect: Callable[[str], tuple[str, int, int, int]],
) -> dict:
    """One row of a raw label table. ``inspect(uri)`` returns ``(sha256, n_bytes, width, height)``
    or raises; an exception becomes the row's ``error`` (the file is named, never dropped
    silently). A source label the task does not map is an error row too."""
    row = dict(task=task, image_uri=uri, source_label=source_label, label=labels.get(source_label),
               sha256=None, n_bytes=None, width=None, height=None, error=None)
    if row["label"] is None:
        row["error"] = f"label {source_label!r} is not mapped in tasks.{task}.labels"
        return row
    try:
        row["sha256"], row["n_bytes"], row["width"], row["height"] = inspect(uri)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded against the file
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def raw_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows from :func:`scan_row` as a raw label table."""
    df = pd.DataFrame(list(rows), columns=RAW_COLUMNS)
    return df.astype({"n_bytes": "Int64", "width": "Int64", "height": "Int64"})


def scan_rows(
    task: str,
    items: Iterable[tuple[str, str]],
    labels: dict[str, str],
    inspect: Callable[[str], tuple[str, int, int, int]],
) -> pd.DataFrame:
    """A raw label table from ``(image_uri, source_label)`` pairs (see :func:`scan_row`)."""
    return raw_frame(scan_row(task, uri, source, labels, inspect) for uri, source in items)


def moved_between_versions(previous: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """Images whose split differs from the previous dataset version (evaluation leakage across
    retrains: a photo the champion trained on must not become a test photo of its challenger)."""
    both = previous[["sha256", "split"]].merge(current[["sha256", "split"]], on="sha256", suffixes=("_before", "_now"))
    return both[both["split_before"] != both["split_now"]]


def concatenate(
    raw: pd.DataFrame, vocabulary: list[str], *, val_fraction: float, test_fraction: float
) -> pd.DataFrame:
    """The SOFAR dataset: readable rows of all tasks, one row per distinct image content."""
    ok = raw[raw["error"].isna()]
    unknown = sorted(set(ok["label"]) - set(vocabulary))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the vocabulary {vocabulary}")
    order = {label: i for i, label in enumerate(vocabulary)}
    rows = []
    for sha, group in ok.groupby("sha256", sort=True):
        labels = sorted(set(group["label"]), key=order.__getitem__)
        rows.append(
            dict(
                sha256=sha,
                image_uri=sorted(group["image_uri"])[0],
                label=labels[0],
                labels="|".join(labels),
                tasks="|".join(sorted(set(group["task"]))),
                multi_label=len(labels) > 1,
                split=split_for(sha, val_fraction, test_fraction),
                n_sources=len(group),
            )
        )
    return pd.DataFrame(rows, columns=DATASET_COLUMNS)


def dataset_hash(dataset: pd.DataFrame) -> str:
    """Content hash of the dataset (images, labels, splits): tags every model trained on it."""
    h = hashlib.sha256()
    for sha, labels, split in sorted(zip(dataset["sha256"], dataset["labels"], dataset["split"], strict=True)):
        h.update(f"{sha}|{labels}|{split}\n".encode())
    return h.hexdigest()


def counts_by(dataset: pd.DataFrame, vocabulary: list[str]) -> pd.DataFrame:
    """Single-label images per label (rows) and split (columns), plus the multi-label count."""
    single = dataset[~dataset["multi_label"]]
    table = pd.crosstab(single["label"], single["split"]).reindex(index=vocabulary, columns=list(SPLITS)).fillna(0)
    table = table.astype(int)
    table["multi_label"] = [int(dataset[dataset["multi_label"]]["labels"].str.split("|").map(
        lambda ls, lab=lab: lab in ls).sum()) for lab in vocabulary]
    return table


def suspicious_labels(tasks: dict[str, dict[str, str]]) -> list[str]:
    """Labels used by one task only that look like a typo of a label another task uses."""
    users: dict[str, set[str]] = {}
    for task, mapping in tasks.items():
        for label in mapping.values():
            users.setdefault(label, set()).add(task)
    findings, seen = [], set()
    for label, tasks_using in sorted(users.items()):
        if len(tasks_using) != 1:
            continue
        others = [lab for lab, t in users.items() if lab != label and t - tasks_using]
        close = difflib.get_close_matches(label, others, n=1, cutoff=0.75)
        if close and frozenset((label, close[0])) not in seen:
            seen.add(frozenset((label, close[0])))
            findings.append(
                f"label {label!r} (task {sorted(tasks_using)[0]}) looks like a typo of {close[0]!r} "
                f"(used by {', '.join(sorted(users[close[0]]))})"
            )
    return findings
