"""Concatenating task-centric datasets into the one SOFAR dataset (pure pandas).

The efficiency-centric idea: N task datasets (defect vs normal, dirt vs normal, ...) become
ONE label space. A label several tasks share (``normal``) is one class; the same photo in two
tasks is one row (deduplicated by the sha256 of its bytes); a photo with different labels in
different tasks is the paper's multi-labelable case and is kept once with all its labels.

Policy for multi-label photos: they stay out of single-label training and validation (cross-
entropy needs one target) and are used to evaluate the top-2 (both labels should be in it).

Inspectors' corrections (``label_corrections``, scanned like a task by
``raw_labels/label_corrections``) are a task source with one rule when they disagree with a
task's label: **the inspector's verdict overrides every task label of the same photo content**
(same sha256, whatever its path), and of several verdicts on one photo **the latest
``corrected_at`` wins** (an exact tie goes to the label that sorts last, never to row order). A
corrected photo is single-label (a verdict on a multi-label photo settles it); one not in any
task joins the dataset under the tasks whose labels include the verdict; one judged
``irrelevant`` leaves the dataset and becomes an OOD calibration image.

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
DATASET_COLUMNS = ["sha256", "image_uri", "label", "labels", "tasks", "multi_label", "split", "n_sources",
                   "corrected_at"]
IRRELEVANT = "irrelevant"
"""The verdict for a photo that belongs to no class (a receipt, a document): never a training label."""
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


def winning_corrections(corrections: pd.DataFrame | None) -> pd.DataFrame:
    """One verdict per photo content: of the readable corrections of the same sha256, the latest
    ``corrected_at`` wins; an exact tie goes to the label that sorts last (never the row order)."""
    if corrections is None or corrections.empty:
        return pd.DataFrame(columns=["sha256", "image_uri", "label", "corrected_at"])
    ok = corrections[corrections["error"].isna()]
    ok = ok.sort_values(["sha256", "corrected_at", "label"], kind="stable")
    return ok.drop_duplicates("sha256", keep="last").reset_index(drop=True)


def _label_tasks(raw: pd.DataFrame, label_tasks: dict[str, list[str]] | None) -> dict[str, set[str]]:
    if label_tasks is not None:
        return {label: set(tasks) for label, tasks in label_tasks.items()}
    ok = raw[raw["error"].isna()]
    return {label: set(group["task"]) for label, group in ok.groupby("label")}


def concatenate(
    raw: pd.DataFrame, vocabulary: list[str], *, val_fraction: float, test_fraction: float,
    corrections: pd.DataFrame | None = None, label_tasks: dict[str, list[str]] | None = None,
) -> pd.DataFrame:
    """The SOFAR dataset: readable rows of all tasks, one row per distinct image content.

    ``corrections`` (rows of the ``raw_labels_label_corrections`` table: ``sha256``,
    ``image_uri``, ``label``, ``corrected_at``, ``error``) override the task labels by the rule
    in the module docstring; ``label_tasks`` maps each label to the tasks that use it (default:
    from ``raw``).
    """
    ok = raw[raw["error"].isna()]
    unknown = sorted(set(ok["label"]) - set(vocabulary))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the vocabulary {vocabulary}")
    verdicts = winning_corrections(corrections)
    wrong = sorted(set(verdicts["label"]) - set(vocabulary) - {IRRELEVANT})
    if wrong:
        raise ValueError(f"corrections with labels {wrong}: neither in the vocabulary {vocabulary} nor {IRRELEVANT!r}")
    verdict_of = {row.sha256: row for row in verdicts.itertuples(index=False)}
    tasks_of = _label_tasks(raw, label_tasks)
    order = {label: i for i, label in enumerate(vocabulary)}
    rows = []
    for sha, group in ok.groupby("sha256", sort=True):
        labels = sorted(set(group["label"]), key=order.__getitem__)
        tasks = set(group["task"])
        row = dict(sha256=sha, image_uri=sorted(group["image_uri"])[0], label=labels[0], labels="|".join(labels),
                   tasks="|".join(sorted(tasks)), multi_label=len(labels) > 1,
                   split=split_for(sha, val_fraction, test_fraction), n_sources=len(group), corrected_at=None)
        verdict = verdict_of.pop(sha, None)
        if verdict is not None:
            if verdict.label == IRRELEVANT:
                continue  # an OOD calibration image now, never a training label
            own = tasks & tasks_of.get(verdict.label, set())
            row.update(label=verdict.label, labels=verdict.label, multi_label=False, n_sources=len(group) + 1,
                       tasks="|".join(sorted(own or tasks_of.get(verdict.label, tasks))),
                       corrected_at=verdict.corrected_at)
        rows.append(row)
    for sha, verdict in verdict_of.items():  # photos no task holds: new labelled photos
        if verdict.label == IRRELEVANT:
            continue
        rows.append(dict(sha256=sha, image_uri=verdict.image_uri, label=verdict.label, labels=verdict.label,
                         tasks="|".join(sorted(tasks_of.get(verdict.label, set()))), multi_label=False,
                         split=split_for(sha, val_fraction, test_fraction), n_sources=1,
                         corrected_at=verdict.corrected_at))
    rows.sort(key=lambda r: r["sha256"])
    return pd.DataFrame(rows, columns=DATASET_COLUMNS)


def correction_effects(raw: pd.DataFrame, corrections: pd.DataFrame | None) -> dict[str, int]:
    """What the winning verdicts do to the dataset, counted: ``relabelled`` task photos (the
    verdict differs from their task labels), ``confirmed`` ones, ``added`` photos no task held,
    ``irrelevant`` verdicts (of which ``removed`` took a photo out of the dataset)."""
    verdicts = winning_corrections(corrections)
    ok = raw[raw["error"].isna()]
    task_labels = ok.groupby("sha256")["label"].agg(lambda s: frozenset(s)).to_dict()
    out = {"verdicts": len(verdicts), "relabelled": 0, "confirmed": 0, "added": 0, "irrelevant": 0, "removed": 0}
    for sha, label in zip(verdicts["sha256"], verdicts["label"], strict=True):
        held = task_labels.get(sha)
        if label == IRRELEVANT:
            out["irrelevant"] += 1
            out["removed"] += held is not None
        elif held is None:
            out["added"] += 1
        elif held == {label}:
            out["confirmed"] += 1
        else:
            out["relabelled"] += 1
    return out


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
