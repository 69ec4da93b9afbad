"""Small command-line helpers for the Makefile: demo data and the run summary.

    python -m sofar_assets.cli demo-data [--out DIR]
    python -m sofar_assets.cli summary
    python -m sofar_assets.cli export-weights PATH   (the image's build step: model.weights_file)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sofar_assets.settings import REPO_ROOT


def demo_data(out: Path) -> None:
    from sofar_assets.lib.synthetic import generate_demo_data

    if (out / "SYNTHETIC.md").exists():
        print(f"demo data already in {out} (SYNTHETIC; delete the folder to regenerate)")
        return
    counts = generate_demo_data(out)
    print(f"SYNTHETIC demo data written to {out}: {counts}")


def summary() -> None:
    import mlflow

    from sofar_assets.config import load_config
    from sofar_assets.defs.predictions import PREDICTIONS_TABLE
    from sofar_assets.defs.resources import build_resources
    from sofar_assets.settings import config_path

    cfg = load_config(config_path())
    res = build_resources(cfg)
    wh = res["warehouse"].get()
    client = res["mlflow_tracking"].client()
    if not wh.table_exists(PREDICTIONS_TABLE):
        sys.exit("no predictions table yet: run `make run` first")
    per_day = wh.query(
        f"SELECT prediction_date, count(*) AS rows, count(error) AS error_rows, "
        f"sum(CASE WHEN is_ood THEN 1 ELSE 0 END) AS ood_rows, max(model_version) AS model_version "
        f"FROM {{table:{PREDICTIONS_TABLE}}} GROUP BY prediction_date ORDER BY prediction_date"
    )
    champ = client.get_model_version_by_alias(cfg.model.name, "champion")
    print("\n=== sofar_assets: summary ===")
    print(f"config:     {cfg.source_file}")
    print(f"champion:   models:/{cfg.model.name}/{champ.version}  (alias @champion)  "
          f"test macro-F1 {champ.tags.get('test_macro_f1', '?')}, OOD threshold {float(champ.tags['ood_threshold']):.3f}")
    print(f"warehouse:  {cfg.storage.warehouse.kind} table '{PREDICTIONS_TABLE}'")
    print(per_day.to_string(index=False))
    print(f"OOD rows:   {int(per_day['ood_rows'].sum())} of {int(per_day['rows'].sum())}")
    print(f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}")
    print("Dagster UI: make ui   (then open http://127.0.0.1:3000)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sofar_assets.cli")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo-data", help="generate the SYNTHETIC demo dataset")
    p.add_argument("--out", type=Path, default=REPO_ROOT / ".sofar" / "demo-data")
    sub.add_parser("summary", help="print rows per day, champion version and OOD count")
    p = sub.add_parser("export-weights", help="write the packaged Lite0 ImageNet weights as safetensors")
    p.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "demo-data":
        demo_data(args.out)
    elif args.cmd == "export-weights":
        from sofar_assets.lib.models import export_offline_weights

        print(f"ImageNet weights written to {export_offline_weights(args.path)}")
    else:
        summary()


if __name__ == "__main__":
    main()
