"""The statistics of Δ AUROC that use every test map, not only each run's AUROC: DeLong's paired test
per seed and pooled over seeds, and the hierarchical (seeds × maps) bootstrap, per method x domain
and for the mean over domains (docs/design.md#stats-delong, #stats-bootstrap).

Runs are paired with the baseline by seed, as everywhere in compare, and their maps by identity
(scores.align): every paired seed of a method must have scored the same maps with the same labels,
else that domain is "not computable: different test maps", said loudly. A seed whose run (either
side) has no scores artifact, or an invalid (NaN/Inf) domain, is left out of these statistics, with
a note; the seed-level statistics of the same comparison still use it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from hdmap_ad.apps.compare.runs import RunRecord, Selection
from hdmap_ad.apps.compare.scores import SCORES_ARTIFACT, DomainScores, RunScores, align
from hdmap_ad.pipeline.stats.common import NOT_COMPUTABLE, finite_or_none

if TYPE_CHECKING:
    from hdmap_ad.pipeline.stats.bootstrap import BootstrapDelta
    from hdmap_ad.pipeline.stats.delong import PooledDeLongResult


@dataclass(frozen=True)
class DomainMeanDeLong:
    """DeLong's Δ AUROC for the mean over domains: the mean of the domains' pooled Δ.

    The domains are disjoint test sets, so given the trained models their test-set errors are
    independent: se = √(Σ se_d²)/D. Like the pooled test it holds test-set noise only.
    """

    domains: list[str]
    seeds: list[int]
    delta: float | None
    se: float | None
    z: float | None
    p: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    method: str = "mean over domains of the pooled DeLong Δ; se = √(Σ se_d²)/D (disjoint test sets)"
    note: str = ""


@dataclass
class PerMap:
    """Per method and scope (domains, mean): the DeLong and bootstrap results and their notes."""

    delong: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> scope -> result
    bootstrap: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> scope -> BootstrapDelta
    scope_notes: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> what was used (JSON)
    notes: list[str] = field(default_factory=list)  # for the report's Notes

    def note(self, method: str, scope: str, text: str) -> None:
        self.scope_notes.setdefault((method, scope), []).append(text)


def domain_mean_delong(
    pooled: dict[str, PooledDeLongResult], domains: Sequence[str], confidence: float
) -> DomainMeanDeLong:
    """The mean over `domains` of the pooled DeLong Δ; not computable unless every domain is, on one
    set of seeds (a mean over fewer domains or other seeds is not the table's mean)."""
    from scipy import stats as sst

    res = DomainMeanDeLong(list(domains), [], None, None, None, None, None, None, confidence)
    missing = [d for d in domains if d not in pooled or pooled[d].se is None]
    if not domains or missing:
        why = f"no computable pooled DeLong for {', '.join(missing) or 'any domain'}"
        return replace(res, note=NOT_COMPUTABLE + why)
    seed_sets = {tuple(pooled[d].seeds) for d in domains}
    if len(seed_sets) > 1:
        return replace(res, note=NOT_COMPUTABLE + "the domains use different seeds")
    deltas = np.array([pooled[d].delta for d in domains], dtype=np.float64)
    ses = np.array([pooled[d].se for d in domains], dtype=np.float64)
    delta, se = float(deltas.mean()), float(math.sqrt(float(np.sum(ses**2)))) / len(domains)
    z = delta / se
    half = float(sst.norm.ppf(0.5 + confidence / 2)) * se
    return DomainMeanDeLong(
        list(domains),
        list(seed_sets.pop()),
        delta,
        se,
        finite_or_none(z),
        finite_or_none(float(2 * sst.norm.sf(abs(z)))),
        delta - half,
        delta + half,
        confidence,
    )


def _domain_inputs(
    method: str,
    baseline: str,
    domain: str,
    seeds: Sequence[int],
    used: dict[str, dict[int, RunRecord]],
    scores: Callable[[str], RunScores],
    out: PerMap,
):
    """(labels, method scores (S, N), baseline scores (S, N), seeds) of one domain, or None with a note."""
    ok: list[int] = []
    for s in seeds:
        why = []
        for who in (baseline, method):
            run = used[who][s]
            if domain in run.invalid_domains:
                why.append(f"{who} invalid (NaN/Inf scores)")
            elif scores(run.run_id).missing:
                why.append(f"{who} has no per-map scores")
            elif domain not in scores(run.run_id).domains:
                why.append(f"{who}'s scores lack {domain}")
        if why:
            out.note(method, domain, f"seed {s} left out of DeLong/bootstrap: {'; '.join(why)}")
        else:
            ok.append(s)
    if not ok:
        out.note(method, domain, NOT_COMPUTABLE + "no paired seed with per-map scores (DeLong, bootstrap)")
        return None
    ref_run = used[baseline][ok[0]]
    ref: DomainScores = scores(ref_run.run_id).domains[domain]
    sm, sb = np.empty((len(ok), len(ref))), np.empty((len(ok), len(ref)))
    how = set()
    for i, s in enumerate(ok):
        for who, rows in ((method, sm), (baseline, sb)):
            run = used[who][s]
            mine = scores(run.run_id).domains[domain]
            digest = ref_run.tags.get("data_digest")
            idx, why = align(ref, mine, same_data=digest is not None and digest == run.tags.get("data_digest"))
            if idx is None:
                line = (
                    f"{NOT_COMPUTABLE}different test maps on {domain}: {who} seed {s} (`{run.run_id[:8]}`) vs "
                    f"{baseline} seed {ok[0]} (`{ref_run.run_id[:8]}`): {why}"
                )
                out.note(method, domain, line)
                out.notes.append(f"**{method} vs {baseline}, {domain}: DeLong/bootstrap {line}**")
                return None
            if why:
                how.add(why)
            rows[i] = mine.scores[idx]
    for why in sorted(how):
        out.note(method, domain, why)
    return ref.labels.astype(np.int64), sm, sb, ok


def per_map_statistics(
    selection: Selection,
    scores: Callable[[str], RunScores],
    baseline: str,
    methods: Sequence[str],
    domains: Sequence[str],
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
    margin: float | None = None,
    alpha: float = 0.05,
) -> PerMap:
    """DeLong (per seed and pooled) and the hierarchical bootstrap for each method vs the baseline on
    `domains` and their mean. `scores(run_id)` gives a run's per-map scores (downloaded once); with a
    `margin` (AUROC's, as a fraction) the bootstrap also gives the verdict's intervals and P(worse /
    equivalent / better)."""
    from hdmap_ad.pipeline.stats.bootstrap import AurocScores, hierarchical_bootstrap_auroc
    from hdmap_ad.pipeline.stats.delong import delong_pooled

    out = PerMap()
    used = selection.used
    if baseline not in used:
        return out
    for method in methods:
        if method == baseline or method not in used:
            continue
        paired = sorted(set(used[method]) & set(used[baseline]))
        if not paired:
            continue
        missing = [
            f"{who} seed {s} (`{used[who][s].run_id[:8]}`)"
            for s in paired
            for who in (baseline, method)
            if scores(used[who][s].run_id).missing
        ]
        if missing:
            out.notes.append(
                f"{method} vs {baseline}: no per-map scores (`{SCORES_ARTIFACT}` artifact) for "
                f"{', '.join(missing)} → DeLong and the hierarchical bootstrap leave those seeds out"
            )
        inputs: dict[str, AurocScores] = {}
        seeds_of: dict[str, list[int]] = {}
        delong: dict[str, Any] = {}
        for d in domains:
            got = _domain_inputs(method, baseline, d, paired, used, scores, out)
            if got is None:
                continue
            labels, sm, sb, ok = got
            delong[d] = delong_pooled(labels, sm, sb, seeds=ok, confidence=confidence)
            inputs[d], seeds_of[d] = AurocScores(labels, sm, sb), ok
        out.runs[method] = {
            "paired_seeds": paired,
            "seeds": {d: seeds_of[d] for d in inputs},
            "runs_without_scores": missing,
        }
        if not inputs:
            continue  # no domain with per-map scores: the notes say why, the report has no per-map table
        delong["mean"] = domain_mean_delong(delong, domains, confidence)
        out.delong[method] = delong

        boot: dict[str, BootstrapDelta] = {}
        t0 = time.perf_counter()
        groups: dict[tuple[int, ...], list[str]] = {}
        for d in inputs:
            groups.setdefault(tuple(seeds_of[d]), []).append(d)
        results = []
        for group in groups.values():
            res = hierarchical_bootstrap_auroc(
                {d: inputs[d] for d in group},
                n_resamples=n_resamples,
                confidence=confidence,
                seed=seed,
                margin=margin,
                alpha=alpha,
            )
            results.append(res)
            boot.update(res.domains)
            if len(groups) == 1 and len(group) == len(domains):
                boot["mean"] = res.mean
        if "mean" not in boot and len(inputs) == len(domains) and domains:
            # the domains use different seeds (an invalid domain, a missing artifact): the mean over domains
            # is taken on the seeds all of them share, as the seed-level mean is
            common = sorted(set.intersection(*(set(v) for v in seeds_of.values())))
            if common:
                sub = {
                    d: AurocScores(
                        inputs[d].labels,
                        inputs[d].method[[seeds_of[d].index(s) for s in common]],
                        inputs[d].baseline[[seeds_of[d].index(s) for s in common]],
                    )
                    for d in domains
                }
                res = hierarchical_bootstrap_auroc(
                    sub, n_resamples=n_resamples, confidence=confidence, seed=seed, margin=margin, alpha=alpha
                )
                results.append(res)
                boot["mean"] = res.mean
                out.note(
                    method,
                    "mean",
                    f"bootstrap of the mean over domains on the seeds all domains share: {', '.join(map(str, common))}",
                )
        if "mean" not in boot:
            lacking = [d for d in domains if d not in inputs]
            out.note(
                method,
                "mean",
                NOT_COMPUTABLE + "hierarchical bootstrap of the mean over domains needs every "
                "domain" + (f" (no usable per-map scores for {', '.join(lacking)})" if lacking else ""),
            )
        out.bootstrap[method] = boot
        out.runs[method].update(
            {
                "n_resamples": n_resamples,
                "confidence": confidence,
                "seed": seed,
                "method": results[0].method if results else None,
                "note": "; ".join(dict.fromkeys(r.note for r in results if r.note)),
                "bootstrap_seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return out
