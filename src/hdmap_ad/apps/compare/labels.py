"""Names the reader sees: methods (with what each label means, said once), scopes and metrics."""

from __future__ import annotations

from hdmap_ad.core.method_params import JOIN, METHODS, method_label

__all__ = ["METRIC_LABELS", "NOT_PERCENT", "method_label", "method_legend", "method_meaning", "scope_label"]

NOT_PERCENT = {"threshold"}  # metrics that are not fractions (shown and summarised as they are)
METRIC_LABELS = {
    "auroc": "AUROC",
    "ap": "AP",
    "f1_max": "F1-max",
    "tpr_at_fpr_1": "TPR@FPR=1%",
    "tpr_at_fpr_5": "TPR@FPR=5%",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "accuracy": "Accuracy",
    "threshold": "Threshold",
    "pixel_auroc": "pixel AUROC",
    "aux_domain_accuracy": "aux domain accuracy",
}


def method_meaning(method: str) -> str:
    """What a method changes, from the method list (a combination's parts joined by '; '), '' if unknown."""
    parts = str(method).split(JOIN)
    if all(p in METHODS for p in parts):
        return "; ".join(METHODS[p].summary for p in parts)
    return ""


def method_legend(methods: list[str]) -> str:
    """'Method 1 (GEM) = `gem`: generalised mean ...; ...': each label explained once."""
    return "; ".join(
        f"{method_label(m)} = `{m}`" + (f": {method_meaning(m)}" if method_meaning(m) else "") for m in methods
    )


def scope_label(scope: str) -> str:
    if scope.startswith("domain_") and len(scope) > 7:
        return f"Domain {scope[7:]}"
    return {"mean": "Mean", "pooled": "Pooled"}.get(scope, scope)
