"""Links between the two UIs: MLflow pages in Dagster metadata, the Dagster run in MLflow tags.

Plain string building from the configured base URLs (``ui.dagster_url``, ``ui.mlflow_url``);
no Dagster or MLflow import. The MLflow routes are the ones its web app serves
(``#/experiments/<id>/runs/<run>``, ``#/models/<name>/versions/<v>``).
"""

from __future__ import annotations

from urllib.parse import quote

# MLflow 3 opens an experiment in its GenAI view unless told otherwise; this experiment tag
# (the value its UI's "custom model development" kind uses) opens it in the classic ML view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML_KIND = "custom_model_development"


def _base(url: str) -> str:
    return url.rstrip("/")


def mlflow_experiment_url(mlflow_url: str, experiment_id: str) -> str:
    return f"{_base(mlflow_url)}/#/experiments/{quote(str(experiment_id), safe='')}"


def mlflow_run_url(mlflow_url: str, experiment_id: str, run_id: str) -> str:
    return f"{mlflow_experiment_url(mlflow_url, experiment_id)}/runs/{quote(str(run_id), safe='')}"


def mlflow_artifact_url(mlflow_url: str, run_id: str, path: str) -> str:
    """The raw artifact as the MLflow server serves it (``/get-artifact``): a PNG opens directly in
    the browser, one click from the Dagster UI."""
    return f"{_base(mlflow_url)}/get-artifact?path={quote(path, safe='')}&run_uuid={quote(str(run_id), safe='')}"


def bigquery_table_url(project: str, dataset: str, table: str) -> str:
    """The table in the BigQuery console."""
    return (f"https://console.cloud.google.com/bigquery?project={quote(project, safe='')}"
            f"&ws=!1m5!1m4!4m3!1s{quote(project, safe='')}!2s{quote(dataset, safe='')}!3s{quote(table, safe='')}")


def mlflow_model_url(mlflow_url: str, model_name: str) -> str:
    return f"{_base(mlflow_url)}/#/models/{quote(model_name, safe='')}"


def mlflow_version_url(mlflow_url: str, model_name: str, version: str | int) -> str:
    return f"{mlflow_model_url(mlflow_url, model_name)}/versions/{quote(str(version), safe='')}"


def dagster_run_url(dagster_url: str, run_id: str) -> str:
    return f"{_base(dagster_url)}/runs/{quote(str(run_id), safe='')}"


def dagster_asset_url(dagster_url: str, asset_key: str | list[str]) -> str:
    parts = asset_key.split("/") if isinstance(asset_key, str) else list(asset_key)
    return f"{_base(dagster_url)}/assets/{'/'.join(quote(p, safe='') for p in parts)}"
