from pathlib import Path

import pytest

from sofar_assets.config import ConfigError, load_config, parse_config

BASE = {
    "tasks": {"defect": {"folder": "t/defect", "labels": {"0_NORMAL": "normal", "1_DEFECT": "defect"}},
              "dirt": {"folder": "t/dirt", "labels": {"0_NORMAL": "normal", "1_DIRT": "dirt"}}},
    "uploads": {"folder": "up"},
    "partitions": {"start_date": "2026-11-01"},
}


def _tree(root: Path) -> None:
    for p in ("t/defect/0_NORMAL", "t/defect/1_DEFECT", "t/dirt/0_NORMAL", "t/dirt/1_DIRT", "up"):
        (root / p).mkdir(parents=True)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks\.defect\.lables: unknown key"):
        parse_config({**BASE, "tasks": {"defect": {"folder": "x", "lables": {}}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"modle: unknown key"):
        parse_config({**BASE, "modle": {"arch": "pmg"}}, base_dir=tmp_path)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    _tree(tmp_path)
    (tmp_path / "c.yaml").write_text(__import__("yaml").safe_dump(BASE))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.resolve(cfg.tasks["defect"].folder) == str(tmp_path / "t/defect")
    assert cfg.mlflow_tracking_uri == f"sqlite:///{tmp_path / '.sofar/mlflow.db'}"
    assert cfg.resolve("gs://bucket/x") == "gs://bucket/x"
    # the label both tasks use is one class
    assert cfg.vocabulary() == ["normal", "defect", "dirt"]
    assert cfg.tasks["dirt"].positive_label == "dirt"


def test_missing_and_unmapped_folders_are_named(tmp_path):
    _tree(tmp_path)
    (tmp_path / "t/dirt/2_MUD").mkdir()
    (tmp_path / "c.yaml").write_text(__import__("yaml").safe_dump({**BASE, "uploads": {"folder": "nope"}}))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    msg = str(err.value)
    assert f"uploads.folder: folder does not exist: {tmp_path / 'nope'}" in msg
    assert "2_MUD is not mapped" in msg


def test_missing_config_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="set SOFAR_CONFIG"):
        load_config(tmp_path / "missing.yaml")


def test_bad_label_and_positive_are_rejected(tmp_path):
    bad = {**BASE, "tasks": {"defect": {"folder": "x", "labels": {"0": "Normal Car"}}}}
    with pytest.raises(ConfigError, match="lower_snake_case"):
        parse_config(bad, base_dir=tmp_path)
    bad = {**BASE, "tasks": {"defect": {"folder": "x", "labels": {"0": "normal"}, "positive": "defect"}}}
    with pytest.raises(ConfigError, match="positive label 'defect'"):
        parse_config(bad, base_dir=tmp_path)


def test_demo_and_prod_configs_parse():
    root = Path(__file__).resolve().parents[1] / "config"
    for name in ("demo.yaml", "prod.yaml"):
        cfg = load_config(root / name, check_paths=False)
        assert cfg.vocabulary()


def test_one_train_config_with_a_description_on_every_field():
    """The ``train:`` section IS lib's recipe settings (no copy to bridge), and each field says
    what it does (the config reference is generated from these descriptions)."""
    from sofar_assets.config import SofarConfig
    from sofar_assets.lib.model import training
    from sofar_assets.lib.model.train_config import TrainConfig

    assert SofarConfig.model_fields["train"].annotation is TrainConfig is training.TrainConfig
    missing = [name for name, f in TrainConfig.model_fields.items() if not (f.description or "").strip()]
    assert not missing, missing
    assert TrainConfig().mixup == 0.4 and TrainConfig().cutmix == 1.0  # the config's defaults, lib's too
