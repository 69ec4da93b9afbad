"""The paper's trade-off reproduced on our own data: the ``tradeoff_report`` asset and its job.

Not part of ``train_and_promote`` (it trains T + 2 models): run it on demand with
``dagster job execute -m sofar_assets.definitions -j tradeoff_report_job``. The math lives in
``lib/model/tradeoff.py`` and ``lib/model/multitask.py``.
"""

import dagster as dg

from sofar_assets.config import SofarConfig
from sofar_assets.defs.k8s import step_tags
from sofar_assets.defs.model import model_spec
from sofar_assets.defs.resources import ImageStoreResource, MlflowResource, WarehouseResource
from sofar_assets.defs.runs import max_runtime_tags
from sofar_assets.lib.common import links
from sofar_assets.lib.common.names import shown
from sofar_assets.lib.data import dataset as ds
from sofar_assets.lib.data import storage
from sofar_assets.lib.model import plots, tracking, tradeoff
from sofar_assets.lib.model.multitask import save_multitask
from sofar_assets.lib.serving import registry
from sofar_assets.settings import git_commit

REPORT_FILE = "tradeoff_report.json"


def _ood_sets(cfg: SofarConfig, cache, context) -> tuple[dict, dict[str, int]]:
    """The readable images of every configured OOD set, and how many were unreadable per set."""
    ood_sets, unreadable = {}, {}
    for name, oset in cfg.ood_sets.items():
        rows, errors = tradeoff.readable_images(storage.list_files(cfg.resolve(oset.folder)), cache)
        for err in errors:
            context.log.warning(f"OOD set {name!r}: skipped {shown(err, 400)}")
        ood_sets[name], unreadable[name] = rows, len(errors)
    return ood_sets, unreadable


def _champion_caveat(report: dict, client, name: str, digest: str) -> None:
    """The champion's version and dataset in the report; a caveat when it was trained on other data."""
    champ = registry.champion_version(client, name)
    champ_hash = client.get_model_version(name, champ).tags.get("dataset_hash") if champ else None
    report["champion"] = {"version": champ, "dataset_hash": champ_hash}
    if champ and champ_hash != digest:
        report["caveats"].append(
            f"the champion v{champ} was trained on dataset {str(champ_hash)[:12]}, "
            f"this report on {digest[:12]}: "
            "re-run train_and_promote first to compare on the champion's own data"
        )


def _report_metadata(report: dict, table: str, png: bytes, run_id: str, digest: str) -> dict:
    caveats = "\n".join(f"- {c}" for c in report["caveats"]) or "- none"
    return {
        "report": dg.MetadataValue.md(f"{table}\n\n**Caveats**\n\n{caveats}"),
        "plot": dg.MetadataValue.md(plots.png_to_markdown(png, "trade-off")),
        "caveats": dg.MetadataValue.json(report["caveats"]),
        "mlflow_run_id": run_id,
        "dataset_hash": digest,
        "device": report["device"],
        **{f"ood_auroc_{s['system']}": dg.MetadataValue.json(s["ood_auroc"]) for s in report["systems"]},
    }


def build_tradeoff_assets(cfg: SofarConfig) -> tuple[dg.AssetsDefinition, object]:
    classes = cfg.vocabulary()

    @dg.asset(deps=["sofar_dataset"], group_name="reports", kinds={"pytorch", "mlflow"}, code_version="1",
              pool="gpu", op_tags=step_tags(cfg, gpu=True, workers=cfg.train.num_workers,
                                            batch_size=cfg.train.batch_size, device=cfg.train.device))
    def tradeoff_report(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow_tracking: MlflowResource,
        image_store: ImageStoreResource,
    ) -> dg.MaterializeResult:
        """The paper's trade-off on our own data: task-centric vs multi-task vs efficiency-centric.

        Trains, on the current ``sofar_dataset`` and its splits, one classifier per task, one
        multi-task learner (shared backbone, one head per task) and one N-class classifier
        with the champion's recipe; then, in this same process and on the same images, per-task
        accuracy / F1 on the test split, OOD AUROC and FPR@95TPR per irrelevant set, the top-2
        hit rate on two-label photos, models / passes / tables, seconds per 1k images and
        training time. ``tradeoff_report.json`` (+ the multi-task model's weights) goes to an
        MLflow run; the report lists its own caveats when its counts are small.
        """
        data = warehouse.get().read_table("sofar_dataset")
        digest, cache = ds.dataset_hash(data), image_store.cache(cfg.model.image_size)
        ood_sets, unreadable = _ood_sets(cfg, cache, context)
        spec = model_spec(cfg, len(classes))  # the champion's network, weights_file included
        try:
            result = tradeoff.compare_systems(
                data, classes, tradeoff.task_spaces(cfg.tasks, classes), spec, cfg.train, cache, ood_sets,
                batch_size=cfg.inference.batch_size, device=cfg.inference.device, log=context.log.info)
        except ValueError as exc:
            raise dg.Failure(description=f"tradeoff_report: {exc}") from exc
        report = {**result.report, "dataset_hash": digest}
        for name, n in unreadable.items():
            report["ood_sets"][name]["unreadable"] = n
        experiment_id = mlflow_tracking.setup()  # this asset logs a run: the write path (creates if missing)
        _champion_caveat(report, mlflow_tracking.client(), cfg.model.name, digest)
        table = tradeoff.markdown_table(report)
        png = plots.tradeoff_png(report["systems"], list(report["task_spaces"]), list(report["ood_sets"]))
        origin = tracking.RunOrigin(context.run_id, links.dagster_run_url(cfg.ui.dagster_url, context.run_id),
                                    git_commit())
        run_id = tracking.log_tradeoff_report(
            experiment_id, f"tradeoff-report-{context.run_id[:8]}",
            tracking.run_tags(origin, digest, sofar_report="tradeoff"), report, table, png, REPORT_FILE,
            lambda folder: save_multitask(result.multitask, folder / "multitask_model",
                                          list(report["task_spaces"]), result.head_labels))
        context.log.info(f"trade-off report in MLflow run {run_id}\n{table}")
        return dg.MaterializeResult(metadata=_report_metadata(report, table, png, run_id, digest))

    job = dg.define_asset_job(
        "tradeoff_report_job", selection=dg.AssetSelection.assets(tradeoff_report),
        description="The paper's trade-off on the current sofar_dataset (trains T + 2 models; "
        "not part of make run).",
        tags=max_runtime_tags("tradeoff_report_job"),
    )
    return tradeoff_report, job
