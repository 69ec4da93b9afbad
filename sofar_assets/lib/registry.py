"""The MLflow model registry: the ``champion`` alias and the tags a version carries.

One home for what is written on a model version and read back from it: the OOD calibration
(score method, temperature, threshold), the conformal label-set rule (method, coverage, qhat,
val images), the lineage tags, and the alias that names the model serving the daily
predictions. Assets and the CLI call these functions; nobody else parses
the tags.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from sofar_assets.lib.conformal import LabelSets

CHAMPION = "champion"
CALIBRATION_TAGS = ("ood_score_method", "ood_temperature", "ood_threshold")
# a version calibrated before label sets existed lacks these; its rows get NULL label sets
CONFORMAL_TAGS = ("conformal_method", "conformal_coverage", "conformal_qhat", "conformal_n_cal")


class NoChampionError(LookupError):
    """The registered model has no ``champion`` alias (or does not exist yet)."""


class UncalibratedError(LookupError):
    """The version has no OOD calibration tags (``ood_calibration`` never ran for it)."""


@dataclass(frozen=True)
class Calibration:
    """What ``daily_predictions`` needs besides the weights: how to score and where to cut,
    and (``label_sets``) the conformal rule for each row's label set."""

    score_method: str
    temperature: float
    threshold: float
    label_sets: LabelSets | None = None

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


def set_champion(client, name: str, version: str) -> str | None:
    """Point ``@champion`` at ``version``; returns the previous champion version (or None)."""
    previous = champion_version(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return previous


HISTORY_HEADER = "Champion history (newest first):"
HISTORY_LINES = 50  # the registered model's description keeps this many moves


def record_promotion(client, name: str, version: str, previous: str | None, *, by: str, reason: str,
                     via: str, gate: str) -> None:
    """Who moved ``@champion``, when, how and why: ``promoted_*`` tags on the version and a line at
    the top of the registered model's description (the newest :data:`HISTORY_LINES` moves).
    Written by every move: the ``champion_model`` asset, ``sofar promote`` and ``sofar rollback``."""
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
