"""The promotion gate: one verdict per check, from a model evaluation dict, with its evidence.

Used by the blocking asset checks on ``model_evaluation`` AND by ``champion_model`` itself
(and by ``sofar promote``), so promoting a stored evaluation later cannot skip the gate.

Every verdict's metadata states its evidence: the point estimate, its bootstrap confidence
interval (``*_ci``, 95 % percentile, from ``lib/model/evaluation.py``) and the image counts. With
fewer test images than ``gate.min_test_images`` (or OOD images than ``gate.min_ood_images``)
a check does not compare noise: it reports ``evidence: insufficient`` with the counts and
passes or fails as ``gate.insufficient_evidence`` says. The first model (no champion yet) is
promoted only under ``gate.first_model: promote_if_checks_pass``; ``require_manual`` leaves
the alias to a person.
"""

from __future__ import annotations

GATE_CHECKS = {
    "macro_f1_not_worse_than_champion":
        "Macro-F1 on the test split is not worse than the champion's by more than gate.max_macro_f1_drop; "
        "with no champion yet, gate.first_model decides.",
    "ood_auroc_above_floor":
        "The lowest OOD AUROC over the irrelevant image sets is at least gate.min_ood_auroc.",
    "ece_below_ceiling": "Expected calibration error (temperature applied) is at most gate.max_ece.",
    "not_worse_than_probe":
        "With gate.require_beats_probe: test macro-F1 is at least the frozen-feature probe's minus "
        "gate.max_macro_f1_drop (the probe is fitted on the same train split).",
    "label_set_coverage":
        "The conformal label sets' coverage on the test split is not significantly below conformal.coverage "
        "minus gate.coverage_tolerance: the upper end of its 95 % Wilson interval reaches that floor "
        "(null tolerance: reported, not enforced).",
}


def _insufficient(gate, what: str, counts: dict) -> tuple[bool, dict]:
    return (gate.insufficient_evidence == "pass",
            {"evidence": "insufficient", "reason": f"too few images to compare {what}", **counts,
             "policy": f"gate.insufficient_evidence={gate.insufficient_evidence}"})


def _f1_check(ev: dict, gate, test_counts: dict) -> tuple[bool, dict]:
    new, old = ev["macro_f1"], ev.get("champion_macro_f1")
    md = {"new_macro_f1": new, "new_macro_f1_ci": ev.get("macro_f1_ci"), **test_counts}
    if ev.get("champion_version") is None:
        if gate.first_model == "require_manual":
            return False, {**md, "reason": "no champion yet and gate.first_model=require_manual: "
                           "set the alias by hand in the MLflow UI to promote the first model"}
        return True, {**md, "reason": "no champion yet: first model, promoted under "
                      "gate.first_model=promote_if_checks_pass"}
    if old is None:
        return True, {**md, "reason": "the champion has other classes: not comparable",
                      "champion_version": ev["champion_version"]}
    if ev["test_images"] < gate.min_test_images:
        return _insufficient(gate, "macro-F1 with the champion", {**md, "champion_macro_f1": old})
    return (bool(new >= old - gate.max_macro_f1_drop),
            {**md, "evidence": "sufficient", "champion_macro_f1": old, "allowed_drop": gate.max_macro_f1_drop,
             "champion_version": ev["champion_version"]})


def _ood_check(ev: dict, gate, test_counts: dict) -> tuple[bool, dict]:
    auc = ev.get("ood_auroc") or {}
    if not auc:
        return True, {"reason": "no ood_sets configured: nothing to gate on"}
    counts = ev.get("ood_images", {})
    md = {"per_set": auc, "per_set_ci": ev.get("ood_auroc_ci", {}), "ood_images": counts,
          "floor": gate.min_ood_auroc, **test_counts}
    short = {k: n for k, n in counts.items() if n < gate.min_ood_images}
    if ev["test_images"] < gate.min_test_images or short:
        return _insufficient(gate, "OOD AUROC", {**md, "min_ood_images": gate.min_ood_images,
                                                 "ood_sets_too_small": short})
    low = min(auc.values())
    return bool(low >= gate.min_ood_auroc), {**md, "evidence": "sufficient", "ood_auroc_min": low}


def _ece_check(ev: dict, gate, test_counts: dict) -> tuple[bool, dict]:
    md = {"ece": ev["ece"], "ece_ci": ev.get("ece_ci"), "ceiling": gate.max_ece, **test_counts}
    if ev["test_images"] < gate.min_test_images:
        return _insufficient(gate, "ECE", md)
    return bool(ev["ece"] <= gate.max_ece), {**md, "evidence": "sufficient"}


def _probe_check(ev: dict, gate, test_counts: dict) -> tuple[bool, dict]:
    pr = ev.get("probe") or {}
    md = {"new_macro_f1": ev["macro_f1"], "probe_macro_f1": pr.get("macro_f1"),
          "probe_accuracy": pr.get("accuracy"), "new_accuracy": ev.get("accuracy"),
          "allowed_drop": gate.max_macro_f1_drop, **test_counts}
    if not gate.require_beats_probe:
        return True, {**md, "reason": "gate.require_beats_probe is off: reported, not enforced"}
    if pr.get("macro_f1") is None:
        return False, {**md, "reason": "gate.require_beats_probe is on but the evaluation has no probe figures"}
    if ev["test_images"] < gate.min_test_images:
        return _insufficient(gate, "macro-F1 with the probe", md)
    return bool(ev["macro_f1"] >= pr["macro_f1"] - gate.max_macro_f1_drop), {**md, "evidence": "sufficient"}


def _coverage_check(ev: dict, gate, test_counts: dict) -> tuple[bool, dict]:
    cf = ev.get("conformal")
    if not cf:
        return True, {"reason": "the evaluation has no label-set figures (evaluated before label sets existed): "
                      "nothing to gate on", **test_counts}
    md = {"coverage": cf["coverage"], "coverage_ci": cf["coverage_ci"], "target": cf["target"],
          "tolerance": gate.coverage_tolerance, "mean_set_size": cf["mean_set_size"], "method": cf["method"],
          **test_counts}
    if gate.coverage_tolerance is None:
        return True, {**md, "reason": "gate.coverage_tolerance is null: reported, not enforced"}
    if ev["test_images"] < gate.min_test_images:
        return _insufficient(gate, "label-set coverage", md)
    # The interval, not the point estimate: on a 50-photo test split the coverage of a rule that
    # meets its target varies with sd ~0.04 (the test share) to ~0.06 (with a 60-image calibration),
    # so a point estimate would fail good models one time in five to seven at tolerance 0.05; with
    # thousands of test photos the two rules agree.
    floor = round(cf["target"] - gate.coverage_tolerance, 12)  # 0.95 - 0.05 is 0.8999999999999999
    return bool(cf["coverage_ci"][1] >= floor), {
        **md, "evidence": "sufficient", "floor": floor,
        "rule": "fails when the upper end of coverage_ci is below floor (significantly under-covers)"}


def gate_results(evaluation: dict, gate) -> dict[str, tuple[bool, dict]]:
    """``{check name: (passed, metadata)}`` for ``evaluation`` under the config's ``gate``."""
    counts = {"test_images": evaluation["test_images"], "min_test_images": gate.min_test_images}
    return {
        "macro_f1_not_worse_than_champion": _f1_check(evaluation, gate, counts),
        "ood_auroc_above_floor": _ood_check(evaluation, gate, counts),
        "ece_below_ceiling": _ece_check(evaluation, gate, counts),
        "not_worse_than_probe": _probe_check(evaluation, gate, counts),
        "label_set_coverage": _coverage_check(evaluation, gate, counts),
    }


def failed_checks(evaluation: dict, gate) -> dict[str, dict]:
    """The checks that failed, with their metadata (empty when the gate passes)."""
    return {k: md for k, (ok, md) in gate_results(evaluation, gate).items() if not ok}
