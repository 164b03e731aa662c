"""Cell texts shared by the Markdown report and the terminal: values, Δ, p, intervals, shares."""

from __future__ import annotations

from collections.abc import Sequence

from hdmap_ad.apps.compare.labels import NOT_PERCENT
from hdmap_ad.apps.compare.result import Comparison, SeedSummary


def fmt_value(v: float | None, metric: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if metric in NOT_PERCENT else f"{100 * v:.2f}"


def fmt_mean_std(entry: SeedSummary, metric: str, expected_n: int | None = None) -> str:
    if entry.mean is None:
        return "no data"
    text = fmt_value(entry.mean, metric)
    if entry.std is not None:
        text += f" ± {fmt_value(entry.std, metric)}"
    if entry.n < 2 or (expected_n is not None and entry.n != expected_n):
        text += f" (n={entry.n})"
    return text


def fmt_delta(v: float | None, metric: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.4g}" if metric in NOT_PERCENT else f"{100 * v:+.2f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def fmt_number(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def delta_cell(c: Comparison) -> str:
    """The paired Δ, or the unpaired difference of means labelled as such."""
    if c.pairing == "unpaired":
        return f"unpaired {fmt_delta(c.unpaired_delta, c.metric)}"
    return fmt_delta(c.paired.delta, c.metric)


def p_cell(c: Comparison) -> str:
    if c.pairing == "unpaired":
        return "n/a (not paired: no common seed)"
    if c.paired.p_ttest is None:
        return f"n/a (n={c.paired.n})" if c.paired.n < 2 else "n/a (no test, see notes)"
    return f"{fmt_p(c.paired.p_ttest)} → {fmt_p(c.paired.p_holm)} {c.significance}"


def mark_cell(c: Comparison) -> str:
    return c.significance if c.paired.p_holm is not None else "no p-value"


def seeds_cell(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds)) or "none"


NOT_COMPUTABLE_CELL = "not computable"


def fmt_interval(low: float | None, high: float | None, metric: str) -> str:
    """[low, high] in points (Δ of a percent metric), or "not computable"."""
    if low is None or high is None:
        return NOT_COMPUTABLE_CELL
    return f"[{fmt_delta(low, metric)}, {fmt_delta(high, metric)}]"


def share_cell(v: float | None) -> str:
    return NOT_COMPUTABLE_CELL if v is None else f"{100 * v:.0f} %"


def improvement_cell(c: Comparison) -> str:
    imp = c.improvement
    if imp is None or imp.share_better is None:
        return NOT_COMPUTABLE_CELL
    return f"{imp.n_better}/{imp.n}" + (f" ({imp.n_ties} tie{'s' if imp.n_ties > 1 else ''})" if imp.n_ties else "")


def not_computable_parts(note: str) -> list[str]:
    """The "not computable: why" parts of a note (several may be joined by '; ')."""
    return [part.strip() for part in note.split("; ") if part.strip().startswith("not computable")]


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> list[str]:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in rows]
    seps = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    return (
        ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"]
        + ["| " + " | ".join(r) + " |" for r in esc]
        + [""]
    )
