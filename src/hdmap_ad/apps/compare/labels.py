"""Names the reader sees: methods (with what each label means, said once), scopes and metrics."""

from __future__ import annotations

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

# The experiment plan's names and what each method changes (docs/design.md#3-the-methods); the order is the
# method registry's, other methods follow alphabetically.
METHOD_LABELS = {
    "baseline": "Baseline",
    "gem": "Method 1 (GEM)",
    "focal": "Method 3 (Focal)",
    "aux": "Method 5-A (Aux)",
    "scale": "Method 6-A (Scale)",
    "topk": "TopK",
}
METHOD_MEANINGS = {
    "baseline": "Dinomaly as published",
    "gem": "GeM pooling over the group distances, in the loss and the map",
    "focal": "focal weighting of the point distances in the loss",
    "aux": "an auxiliary domain classifier on the bottleneck",
    "scale": "learned weights of the scale groups",
    "topk": "loss on the top-k hardest points of the batch",
}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_legend(methods: list[str]) -> str:
    """'Method 1 (GEM) = `gem`: GeM pooling ...; ...': each label explained once."""
    return "; ".join(
        f"{method_label(m)} = `{m}`" + (f": {METHOD_MEANINGS[m]}" if m in METHOD_MEANINGS else "") for m in methods
    )


def scope_label(scope: str) -> str:
    if scope.startswith("domain_") and len(scope) > 7:
        return f"Domain {scope[7:]}"
    return {"mean": "Mean", "pooled": "Pooled"}.get(scope, scope)
