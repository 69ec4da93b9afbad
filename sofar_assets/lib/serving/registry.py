"""The MLflow model registry: the ``champion`` alias and the tags a version carries.

One home for what is written on a model version and read back from it: the OOD calibration
(score method, temperature, threshold), the conformal label-set rule (method, coverage, qhat,
val images), the lineage tags, and the alias that names the model serving the daily
predictions. Assets and the CLI call these functions; nobody else parses
the tags.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from sofar_assets.lib.common.text import text_problem
from sofar_assets.lib.model.conformal import LabelSets
from sofar_assets.lib.warehouse.predictions import PREDICTION_DATE

CHAMPION = "champion"
CALIBRATION_TAGS = ("ood_score_method", "ood_temperature", "ood_threshold")
# a version calibrated before label sets existed lacks these; its rows get NULL label sets
CONFORMAL_TAGS = ("conformal_method", "conformal_coverage", "conformal_qhat", "conformal_n_cal")


class NoChampionError(LookupError):
    """The registered model has no ``champion`` alias (or does not exist yet)."""


class UncalibratedError(LookupError):
    """The version has no OOD calibration tags (``ood_calibration`` never ran for it)."""


class EvidenceError(LookupError):
    """The registry holds no usable evaluation of a version, or the evaluation offered for the
    gate is not the one the registry holds; the message names the version and the difference."""


def parse_version(text: str) -> str:
    """A model version as MLflow numbers them: ``"2"``, ``"02"`` and ``"v2"`` are all ``"2"``;
    anything else is a ``ValueError`` naming it (``v2 -> v02`` would break the history)."""
    raw = str(text).strip()
    digits = raw[1:] if raw[:1] in ("v", "V") else raw
    if not digits.isascii() or not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"{text!r} is not a model version: versions are whole numbers from 1 (e.g. 3 or v3)")
    return str(int(digits))


def one_line(value: str, what: str) -> str:
    """``value`` if it is one line of plain text, else a ``ValueError`` naming ``what``."""
    why = text_problem(value)
    if why:
        raise ValueError(f"{what} {why}")
    return value


@dataclass(frozen=True)
class Calibration:
    """What ``daily_predictions`` needs besides the weights: how to score and where to cut,
    and (``label_sets``) the conformal rule for each row's label set."""

    score_method: str
    temperature: float
    threshold: float
    label_sets: LabelSets | None = None

    def as_artifact(self, target_tpr: float | None = None) -> dict:
        """JSON-able; what ``calibration.json`` in the model package holds (lib/serving/pyfunc.py reads it)."""
        return {"score_method": self.score_method, "temperature": float(self.temperature),
                "threshold": float(self.threshold), "target_tpr": target_tpr,
                "label_sets": self.label_sets.as_dict() if self.label_sets is not None else None}

    def as_tags(self, target_tpr: float | None = None) -> dict[str, str]:
        tags = {
            "ood_score_method": self.score_method,
            "ood_temperature": repr(float(self.temperature)),
            "ood_threshold": repr(float(self.threshold)),
        }
        if target_tpr is not None:
            tags["ood_target_tpr"] = str(target_tpr)
        if self.label_sets is not None:
            ls = self.label_sets
            tags |= {"conformal_method": ls.method, "conformal_coverage": repr(float(ls.coverage)),
                     "conformal_qhat": repr(float(ls.qhat)), "conformal_n_cal": str(int(ls.n_cal))}
        return tags


def champion_version(client, name: str) -> str | None:
    """The version behind ``@champion``; None only when there is no such model or alias yet.

    Any other registry error propagates: a gate that cannot reach the registry must not pass.
    """
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def champion(client, name: str):
    """The champion's ``ModelVersion``; raises :class:`NoChampionError` naming the model."""
    version = champion_version(client, name)
    if version is None:
        raise NoChampionError(
            f"no '{CHAMPION}' alias on registered model {name!r}. Materialize the training group "
            "(sofar_classifier → champion_model) or set the alias in the MLflow UI."
        )
    return client.get_model_version(name, version)


STACK_TAG = "champion_stack"
"""Registered-model tag: the champions, oldest first, comma-separated. A promotion pushes, a
rollback pops: rolling back twice goes two champions back, never back and forth."""
STACK_MAX = 200  # versions kept (an MLflow tag holds 5000 characters)


def champion_stack(client, name: str) -> list[str]:
    """The champion history as a stack (oldest first); empty for a registry older than it."""
    raw = dict(client.get_registered_model(name).tags).get(STACK_TAG, "")
    return [parse_version(v) for v in raw.split(",") if v.strip()]


def _write_stack(client, name: str, stack: list[str]) -> None:
    client.set_registered_model_tag(name, STACK_TAG, ",".join(stack[-STACK_MAX:]))


def set_champion(client, name: str, version: str, *, rollback: bool = False) -> str | None:
    """Point ``@champion`` at ``version`` and keep the stack: a promotion pushes ``version``; a
    rollback (``rollback=True``) pops back to it when it is on the stack (else pushes it).
    Returns the previous champion version (or None)."""
    version = parse_version(version)
    previous = champion_version(client, name)
    stack = champion_stack(client, name)
    if previous is not None and (not stack or stack[-1] != previous):
        stack.append(previous)  # a registry older than the stack, or an alias moved in the MLflow UI
    if rollback and version in stack:
        stack = stack[: len(stack) - stack[::-1].index(version)]
    else:
        stack.append(version)
    client.set_registered_model_alias(name, CHAMPION, version)
    _write_stack(client, name, stack)
    return previous


def rollback_target(client, name: str, current: str) -> str | None:
    """Where a rollback goes: the champion below ``current`` on the stack. For a registry older
    than the stack: the version ``current`` replaced (its ``promoted_from`` tag), else the newest
    older version that carries a calibration. None: nothing to go back to."""
    stack = champion_stack(client, name)
    if stack:
        below = stack[:-1] if stack[-1] == current else stack  # else the alias was moved by hand
        return below[-1] if below else None
    previous = dict(client.get_model_version(name, current).tags).get("promoted_from")
    if previous:
        return parse_version(previous)
    older = sorted((v for v in client.search_model_versions(f"name='{name}'") if int(v.version) < int(current)),
                   key=lambda v: int(v.version), reverse=True)
    for v in older:
        if all(t in dict(v.tags) for t in CALIBRATION_TAGS):
            return str(v.version)
    return None


# -- a registry that existed ----------------------------------------------------------------------
def predicted_versions(wh, name: str, *, table: str = "predictions") -> dict[str, int]:
    """``{model_version: rows}`` of ``name``'s rows in the predictions table: the warehouse's
    memory of a registry (one ``GROUP BY`` in the warehouse; empty when there is no table)."""
    if not wh.table_exists(table):
        return {}
    counts = wh.count_by(table, PREDICTION_DATE, dt.date(1900, 1, 1), dt.date(9999, 1, 1),
                         by=["model_name", "model_version"])
    mine = counts[counts["model_name"] == name]
    return {str(v): int(n) for v, n in zip(mine["model_version"], mine["n"], strict=True) if v is not None}


def lost_registry_message(where: str, name: str, versions: dict[str, int]) -> str:
    """The error for a registry that is gone while the warehouse holds rows of its versions."""
    top = max(versions, key=lambda v: int(v) if str(v).isdigit() else 0)
    return (f"MLflow registry {where} has no model {name!r}, but the warehouse holds {sum(versions.values())} "
            f"prediction rows from its versions (up to v{top}): the registry that scored them is gone. Restore it "
            "from a backup; or, knowing that new versions restart at 1 (rows saying model_version=1 would then "
            "name another model), start a new one explicitly with `sofar init-registry`. Nothing was created.")


# -- the gate's evidence: what the registry holds ----------------------------------------------------
GATE_CONFIG_TAG = "gate_config"
"""Version tag: the ``gate:`` settings (JSON) the version was trained under; every later
re-check of its gate (``sofar promote``/``rollback``, ``champion_model``) uses these."""
EVALUATION_ARTIFACT = "evaluation.json"
# run metric -> key of evaluation.json: the metrics live in the tracking database, the artifact
# in the artifact store; both must agree before either is believed
EVIDENCE_METRICS = {"test_macro_f1": "macro_f1", "test_accuracy": "accuracy", "test_ece": "ece"}


def record_gate_config(client, name: str, version: str, gate) -> None:
    """Tag ``version`` with the gate settings it is trained (and later re-checked) under."""
    client.set_model_version_tag(name, str(version), GATE_CONFIG_TAG,
                                 json.dumps(gate.model_dump(), sort_keys=True))


def recorded_gate(model_version, fallback):
    """``(gate settings, where they come from)``: the version's :data:`GATE_CONFIG_TAG`, or
    ``fallback`` (the caller's config) for a version trained before the tag existed. The tag is
    read back with ``fallback``'s own model class (config.GateConfig: lib does not import config)."""
    raw = dict(model_version.tags).get(GATE_CONFIG_TAG)
    if raw is None:
        return fallback, f"the current config's gate (v{model_version.version} has no {GATE_CONFIG_TAG} tag)"
    try:
        return type(fallback).model_validate(json.loads(raw)), f"the gate v{model_version.version} was trained under"
    except ValueError as exc:
        raise EvidenceError(f"{model_version.name} v{model_version.version}: its {GATE_CONFIG_TAG} tag is "
                            f"not a gate config ({str(exc).splitlines()[0]})") from None


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def registered_evaluation(client, name: str, version: str) -> dict:
    """The evaluation ``model_evaluation`` logged to ``version``'s MLflow run (``evaluation.json``),
    checked against the run's test metrics and against the version it names. Raises
    :class:`EvidenceError` when it is missing or disagrees."""
    mv = client.get_model_version(name, str(version))
    head = f"{name} v{mv.version}"
    if not mv.run_id:
        raise EvidenceError(f"{head} has no MLflow run: it was never evaluated")
    with tempfile.TemporaryDirectory(prefix="sofar-eval-") as tmp:
        try:
            path = client.download_artifacts(mv.run_id, EVALUATION_ARTIFACT, tmp)
            evaluation = json.loads(Path(path).read_text(encoding="utf-8"))
        except (MlflowException, OSError, ValueError):
            raise EvidenceError(f"{head}: no readable {EVALUATION_ARTIFACT} in its run {mv.run_id} "
                                "(materialize model_evaluation for it)") from None
    if not isinstance(evaluation, dict):
        raise EvidenceError(f"{head}: {EVALUATION_ARTIFACT} in run {mv.run_id} is not an evaluation")
    if str(evaluation.get("model_name")) != name or str(evaluation.get("version")) != str(mv.version):
        raise EvidenceError(f"{head}: {EVALUATION_ARTIFACT} in run {mv.run_id} evaluates "
                            f"{evaluation.get('model_name')} v{evaluation.get('version')}, not this version")
    metrics = client.get_run(mv.run_id).data.metrics
    for metric, key in EVIDENCE_METRICS.items():
        if metric not in metrics:
            raise EvidenceError(f"{head}: run {mv.run_id} has no {metric} metric to confirm its "
                                f"{EVALUATION_ARTIFACT} (materialize model_evaluation for it)")
        value = evaluation.get(key)
        if not isinstance(value, (int, float)) or not math.isclose(float(value), metrics[metric], rel_tol=1e-9,
                                                                   abs_tol=1e-12):
            raise EvidenceError(f"{head}: {EVALUATION_ARTIFACT} says {key}={value!r} but run {mv.run_id} logged "
                                f"{metric}={metrics[metric]!r}; the evaluation was edited after it was logged")
    return evaluation


def evidence_mismatch(offered: dict, registered: dict) -> list[str]:
    """The top-level fields in which an evaluation offered for the gate (the IO manager's stored
    output) differs from the one the registry holds (empty: the same)."""
    offered, registered = (json.loads(json.dumps(x, allow_nan=True)) for x in (offered, registered))
    return sorted(k for k in offered.keys() | registered.keys()
                  if not _same(offered.get(k, "<missing>"), registered.get(k, "<missing>")))


def registry_gate(client, name: str, version: str, fallback_gate, *, offered: dict | None = None):
    """The promotion gate of ``version`` from what the registry holds: its registered evaluation
    under its recorded gate settings. ``offered`` (an evaluation from elsewhere) must equal the
    registered one, else :class:`EvidenceError` lists the fields that differ.

    Returns ``(results, gate source)``; ``results`` is ``lib.gate.gate_results``'s dict."""
    from sofar_assets.lib.model.gate import gate_results

    registered = registered_evaluation(client, name, version)
    if offered is not None and (diff := evidence_mismatch(offered, registered)):
        raise EvidenceError(f"{name} v{version}: the evaluation offered for the gate differs from the one "
                            f"logged to its MLflow run in {', '.join(diff)}; promotion refused (was the IO "
                            "manager's model_evaluation.json edited? materialize model_evaluation again)")
    gate, source = recorded_gate(client.get_model_version(name, str(version)), fallback_gate)
    return gate_results(registered, gate), source


HISTORY_HEADER = "Champion history (newest first):"
HISTORY_LINES = 50  # the registered model's description keeps this many moves


def record_promotion(client, name: str, version: str, previous: str | None, *, by: str, reason: str,
                     via: str, gate: str) -> None:
    """Who moved ``@champion``, when, how and why: ``promoted_*`` tags on the version and a line at
    the top of the registered model's description (the newest :data:`HISTORY_LINES` moves).
    Written by every move: the ``champion_model`` asset, ``sofar promote`` and ``sofar rollback``.
    ``by`` and ``reason`` must be one line each (a newline would forge history lines)."""
    one_line(by, "the name of who moves the champion")
    one_line(reason, "the reason")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    tags = {"promoted_by": by, "promoted_reason": reason, "promoted_at": now,
            "promoted_from": previous or "", "promoted_via": via, "promotion_gate": gate}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    line = f"- {now} v{previous or '-'} -> v{version} by {by} ({via}, gate {gate}): {reason}"
    desc = client.get_registered_model(name).description or ""
    head, _, history = desc.partition(HISTORY_HEADER)
    lines = [line, *[x for x in history.strip().splitlines() if x.strip()]][:HISTORY_LINES]
    client.update_registered_model(name, f"{head.rstrip()}\n\n{HISTORY_HEADER}\n" + "\n".join(lines))


def write_calibration(client, name: str, version: str, calibration: Calibration, *,
                      target_tpr: float | None = None, extra: dict[str, str] | None = None) -> None:
    """The calibration as the version's tags (for people, the UI and the gate) AND as
    ``calibration.json`` in its model package (what the served model scores with)."""
    from sofar_assets.lib.serving.packaging import write_calibration_artifact

    write_calibration_artifact(client, name, str(version), calibration.as_artifact(target_tpr))
    for key, value in {**calibration.as_tags(target_tpr), **(extra or {})}.items():
        client.set_model_version_tag(name, str(version), key, value)


def read_calibration(model_version) -> Calibration:
    """The calibration tagged on a ``ModelVersion``; :class:`UncalibratedError` if the OOD tags
    are absent. ``label_sets`` is None for a version calibrated before label sets existed."""
    tags = dict(model_version.tags)
    if "ood_threshold" not in tags or "ood_temperature" not in tags:
        raise UncalibratedError(
            f"{model_version.name} v{model_version.version} has no OOD calibration tags; materialize "
            "ood_calibration for it or move the alias to a calibrated version."
        )
    label_sets = None
    if all(t in tags for t in CONFORMAL_TAGS):
        label_sets = LabelSets(method=tags["conformal_method"], coverage=float(tags["conformal_coverage"]),
                               qhat=float(tags["conformal_qhat"]), n_cal=int(tags["conformal_n_cal"]))
    return Calibration(
        score_method=tags.get("ood_score_method", "max_logit"),
        temperature=float(tags["ood_temperature"]),
        threshold=float(tags["ood_threshold"]),
        label_sets=label_sets,
    )


def model_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


PROXIED_SCHEME = "mlflow-artifacts:"


def direct_source(client, name: str, version: str, artifacts_destination: str | None = None) -> str | None:
    """Where a model version's files can be read WITHOUT the tracking server's artifact proxy,
    or None (then read ``models:/name/version`` through the server).

    A version stored under a direct store (``gs://``, a local path) is read there. A version
    stored through the proxy (``mlflow-artifacts:/<path>``, a server run with
    ``--serve-artifacts --artifacts-destination DEST``) is read at ``DEST/<path>`` when
    ``artifacts_destination`` (``storage.mlflow.artifacts_destination``) names DEST, e.g.
    ``gs://sofar-ml/mlartifacts``: each shard pod then downloads the model from GCS itself,
    not through the server."""
    uri = str(client.get_model_version_download_uri(name, str(version)))
    if uri.startswith(PROXIED_SCHEME):
        if not artifacts_destination:
            return None
        path = uri[len(PROXIED_SCHEME):].lstrip("/")
        return f"{artifacts_destination.rstrip('/')}/{path}"
    if uri.startswith(("gs://", "/", "file:")):
        return uri
    return None
