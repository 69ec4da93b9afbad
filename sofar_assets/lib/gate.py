"""The promotion gate: one verdict per check, from a model evaluation dict.

Used by the blocking asset checks on ``model_evaluation`` AND by ``champion_model`` itself
(and by ``sofar promote``), so promoting a stored evaluation later cannot skip the gate.
"""

from __future__ import annotations

GATE_CHECKS = {
    "macro_f1_not_worse_than_champion":
        "Macro-F1 on the test split is not worse than the champion's by more than gate.max_macro_f1_drop.",
    "ood_auroc_above_floor":
        "The lowest OOD AUROC over the irrelevant image sets is at least gate.min_ood_auroc.",
    "ece_below_ceiling": "Expected calibration error (temperature applied) is at most gate.max_ece.",
}


def gate_results(evaluation: dict, gate) -> dict[str, tuple[bool, dict]]:
    """``{check name: (passed, metadata)}`` for ``evaluation`` under the config's ``gate``."""
    new, old = evaluation["macro_f1"], evaluation["champion_macro_f1"]
    if old is None:
        f1 = (True, {"new_macro_f1": new, "reason": "no comparable champion yet"})
    else:
        f1 = (bool(new >= old - gate.max_macro_f1_drop),
              {"new_macro_f1": new, "champion_macro_f1": old, "allowed_drop": gate.max_macro_f1_drop,
               "champion_version": evaluation["champion_version"]})
    auc = evaluation["ood_auroc_min"]
    if auc is None:
        ood_ok = (True, {"reason": "no ood_sets configured: nothing to gate on"})
    else:
        ood_ok = (bool(auc >= gate.min_ood_auroc),
                  {"ood_auroc_min": auc, "floor": gate.min_ood_auroc, "per_set": evaluation["ood_auroc"]})
    ece = (bool(evaluation["ece"] <= gate.max_ece), {"ece": evaluation["ece"], "ceiling": gate.max_ece})
    return {"macro_f1_not_worse_than_champion": f1, "ood_auroc_above_floor": ood_ok, "ece_below_ceiling": ece}


def failed_checks(evaluation: dict, gate) -> dict[str, dict]:
    """The checks that failed, with their metadata (empty when the gate passes)."""
    return {k: md for k, (ok, md) in gate_results(evaluation, gate).items() if not ok}
