"""The trade-off report: the multi-task baseline done right, the KL score, and the asset end to end."""

from __future__ import annotations

import json
import math

import dagster as dg
import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sofar_assets.config import load_config
from sofar_assets.definitions import TRAINING_SELECTION, build_definitions
from sofar_assets.lib.data.dataset import dataset_hash
from sofar_assets.lib.model import tradeoff
from sofar_assets.lib.model.models import ModelSpec
from sofar_assets.lib.model.multitask import (
    IGNORE,
    MultiTaskDataset,
    MultiTaskNet,
    load_multitask,
    multitask_loss,
    save_multitask,
    train_multitask,
)
from sofar_assets.lib.model.training import TrainConfig

from conftest import _assets, write_config

# --------------------------------------------------------------------------- KL to uniform


def test_kl_to_uniform_matches_hand_computed_value():
    # logits (0, ln 3) -> p = (1/4, 3/4); KL(p || u) = 1/4 ln 1/4 + 3/4 ln 3/4 + ln 2
    hand = 0.25 * math.log(0.25) + 0.75 * math.log(0.75) + math.log(2)
    assert hand == pytest.approx(0.1308120, abs=1e-6)
    got = tradeoff.kl_to_uniform(np.array([[0.0, math.log(3.0)]]))
    assert got[0] == pytest.approx(hand, abs=1e-12)
    # not the reversed divergence KL(u || p) = -ln 2 - (ln 1/4 + ln 3/4) / 2 = 0.1438...
    assert got[0] != pytest.approx(-math.log(2) - 0.5 * (math.log(0.25) + math.log(0.75)), abs=1e-3)


def test_kl_to_uniform_bounds_and_sum_over_heads():
    kl = tradeoff.kl_to_uniform(np.array([[1.0, 1.0, 1.0], [1000.0, 0.0, -1000.0]]))
    assert kl[0] == pytest.approx(0.0, abs=1e-12)  # uniform prediction: no information
    assert kl[1] == pytest.approx(math.log(3), abs=1e-9)  # one-hot: log K, finite for huge logits
    heads = [np.array([[0.0, math.log(3.0)]]), np.array([[2.0, 2.0, 2.0]]), np.array([[1000.0, 0.0]])]
    expected = (0.25 * math.log(0.25) + 0.75 * math.log(0.75) + math.log(2)) + 0.0 + math.log(2)
    assert tradeoff.multitask_kl_score(heads)[0] == pytest.approx(expected, abs=1e-9)


def test_label_scores_take_each_labels_best_task_probability():
    spaces = [tradeoff.TaskSpace("defect", ("normal", "defect"), "defect"),
              tradeoff.TaskSpace("dirt", ("normal", "dirt"), "dirt")]
    vocab = ["normal", "defect", "dirt"]
    heads = [np.log(np.array([[0.2, 0.8]])), np.log(np.array([[0.4, 0.6]]))]
    np.testing.assert_allclose(tradeoff.label_scores(heads, spaces, vocab), [[0.4, 0.8, 0.6]])


# --------------------------------------------------------------------------- multi-task learner

SPEC = ModelSpec(num_classes=5, backbone="efficientnet_lite0", image_size=32, pretrained=False)
HEADS = [2, 3]


class _Colours(torch.utils.data.Dataset):
    """Flat-colour uint8 images; task 0 (2 classes) on the first half, task 1 (3 classes) on the rest."""

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        self.targets = np.full((n, 2), IGNORE, dtype=np.int64)
        half = n // 2
        self.targets[:half, 0] = np.arange(half) % 2
        self.targets[half:, 1] = np.arange(n - half) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def test_multitask_loss_sums_each_heads_own_images():
    torch.manual_seed(0)
    h0, h1 = torch.randn(4, 2), torch.randn(4, 3)
    y = torch.tensor([[1, IGNORE], [0, IGNORE], [IGNORE, 2], [1, 0]])
    hand = F.cross_entropy(h0[[0, 1, 3]], y[[0, 1, 3], 0]) + F.cross_entropy(h1[[2, 3]], y[[2, 3], 1])
    assert multitask_loss([h0, h1], y).item() == pytest.approx(hand.item(), rel=1e-6)
    # a head none of whose images is in the batch gets no gradient
    h0.requires_grad_(True)
    h1.requires_grad_(True)
    multitask_loss([h0, h1], torch.tensor([[IGNORE, 1], [IGNORE, 2], [IGNORE, 0], [IGNORE, 0]])).backward()
    assert h1.grad.abs().sum() > 0
    assert h0.grad is None or not h0.grad.any()


def test_multitask_heads_are_trained_saved_and_load_back(tmp_path):
    data = _Colours(16)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=3, device="cpu")
    torch.manual_seed(cfg.seed)  # train_multitask seeds the same way before building its model
    init = MultiTaskNet(SPEC, HEADS).state_dict()
    ds = MultiTaskDataset(data, data.targets)
    result = train_multitask(SPEC, HEADS, ds, ds, cfg, log=lambda _: None)
    model = result.model
    state = model.state_dict()
    for t, k in enumerate(HEADS):
        # registered modules: in the state dict (saved) and moved by the optimizer (trained)
        assert state[f"heads.{t}.weight"].shape == (k, model.backbone.num_features)
        assert not torch.equal(state[f"heads.{t}.weight"], init[f"heads.{t}.weight"]), f"head {t} was not trained"
    stem = "backbone.conv_stem.weight"
    assert not torch.equal(state[stem], init[stem])  # the shared backbone is fine-tuned too

    pkg = save_multitask(model, tmp_path / "mt", ["colour_a", "colour_b"], [["a0", "a1"], ["b0", "b1", "b2"]])
    loaded, meta = load_multitask(pkg)
    assert meta["tasks"] == ["colour_a", "colour_b"] and loaded.head_sizes == HEADS
    back = loaded.state_dict()
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value.cpu()), key
    # same weights, same memory format (training uses channels_last) -> the very same logits
    x = (data.x[:4].float() / 255).contiguous(memory_format=torch.channels_last)
    loaded = loaded.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.cpu().eval()(x), rtol=0, atol=0)


def test_multitask_net_refuses_inconsistent_heads():
    with pytest.raises(ValueError, match="sum of head sizes"):
        MultiTaskNet(SPEC, [2, 2])
    with pytest.raises(ValueError, match="at least 2 classes"):
        MultiTaskNet(ModelSpec(num_classes=3, image_size=32, pretrained=False), [1, 2])


def test_task_spaces_need_two_labels_per_task():
    cfg = type("T", (), {"labels": {"A": "only"}, "positive_label": "only"})()
    with pytest.raises(ValueError, match="tasks.solo"):
        tradeoff.task_spaces({"solo": cfg}, ["only"])


# --------------------------------------------------------------------------- the asset, demo-sized


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, demo_data):
    folder = tmp_path_factory.mktemp("tradeoff")
    cfg = load_config(write_config(folder, demo_data, model={"image_size": 32}, train={"epochs": 1}))
    defs = build_definitions(cfg)
    result = dg.materialize(
        _assets(defs), selection=dg.AssetSelection.groups("ingest") | dg.AssetSelection.assets("tradeoff_report"),
        resources=defs.resources, instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    md = result.asset_materializations_for_node("tradeoff_report")[-1].metadata
    mlflow_res = defs.resources["mlflow_tracking"]
    mlflow_res.setup()
    local = mlflow.artifacts.download_artifacts(run_id=md["mlflow_run_id"].value, artifact_path="tradeoff_report.json",
                                                dst_path=str(folder / "dl"))
    report = json.loads(open(local).read())
    return {"cfg": cfg, "defs": defs, "md": md, "report": report, "folder": folder}


def test_tradeoff_report_has_its_own_job_outside_train_and_promote(report_run):
    defs = report_run["defs"]
    job = defs.resolve_job_def("tradeoff_report_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"tradeoff_report"}
    training = TRAINING_SELECTION.resolve(defs.resolve_asset_graph())
    assert dg.AssetKey("tradeoff_report") not in training


def test_tradeoff_report_json_structure_and_ranges(report_run):
    report, cfg = report_run["report"], report_run["cfg"]
    systems = {s["system"]: s for s in report["systems"]}
    assert list(systems) == list(tradeoff.SYSTEMS)
    tasks, sets = list(cfg.tasks), list(cfg.ood_sets)
    t = len(tasks)
    assert {k: systems["task_centric"][k] for k in ("models", "passes_per_image", "tables")} == dict.fromkeys(
        ("models", "passes_per_image", "tables"), t)
    for name in ("multi_task", "efficiency_centric"):
        assert (systems[name]["models"], systems[name]["passes_per_image"], systems[name]["tables"]) == (1, 1, 1)
    assert systems["multi_task"]["heads"] == t
    for s in report["systems"]:
        assert {"system", "models", "passes_per_image", "tables", "s_per_1k_images", "ood_auroc", "tasks"} <= set(s)
        assert math.isfinite(s["s_per_1k_images"]) and s["s_per_1k_images"] > 0
        assert math.isfinite(s["train_s"]) and s["train_s"] > 0
        assert set(s["tasks"]) == set(tasks)
        for m in s["tasks"].values():
            assert 0 <= m["accuracy"] <= 1 and 0 <= m["f1"] <= 1 and m["n"] > 0
        assert set(s["ood_auroc"]) == set(sets)
        for v in [*s["ood_auroc"].values(), *s["ood_fpr_at_95tpr"].values()]:
            assert 0 <= v <= 1
        assert 0 <= s["top2_joint_hit_rate"] <= 1  # the demo has three defect|dirt photos
    # every system was timed over the same images
    assert report["eval_images"] == report["test_images"] + report["multi_label_images"] + sum(
        o["images"] for o in report["ood_sets"].values())
    assert report["multi_label_images"] == 3
    assert systems["multi_task"]["ood_score"].startswith("kl_to_uniform")
    assert set(systems["multi_task"]["ood_auroc_max_logit"]) == set(sets)
    # trained on the dataset version the warehouse holds, with the same hash the champion is tagged with
    data = report_run["defs"].resources["warehouse"].get().read_table("sofar_dataset")
    assert report["dataset_hash"] == dataset_hash(data)
    assert report["task_spaces"]["defect"] == {"labels": ["normal", "defect"], "positive": "defect",
                                               "train_images": report["task_spaces"]["defect"]["train_images"],
                                               "test_images": systems["efficiency_centric"]["tasks"]["defect"]["n"]}


def test_tradeoff_report_states_its_small_counts(report_run):
    caveats = report_run["report"]["caveats"]
    assert any("task defect" in c and tradeoff.TOO_FEW in c for c in caveats)
    assert any("OOD set documents" in c and tradeoff.TOO_FEW in c for c in caveats)
    md = report_run["md"]
    assert tradeoff.TOO_FEW in md["report"].value
    assert "| efficiency_centric |" in md["report"].value
    assert "data:image/png;base64," in md["plot"].value


def test_tradeoff_report_saves_the_multitask_learner(report_run):
    md, folder, cfg = report_run["md"], report_run["folder"], report_run["cfg"]
    local = mlflow.artifacts.download_artifacts(run_id=md["mlflow_run_id"].value, artifact_path="multitask_model",
                                                dst_path=str(folder / "mt"))
    model, meta = load_multitask(local)
    assert meta["tasks"] == list(cfg.tasks)
    assert len(model.heads) == len(cfg.tasks)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, sum(model.head_sizes)) and torch.isfinite(out).all()
