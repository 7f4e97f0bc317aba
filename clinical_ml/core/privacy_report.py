"""The anonymization page a privacy officer reads: what was removed, generalized, suppressed; k; max risk.

Only counts, column names and policy settings appear here, never a value from the data.
"""

from clinical_ml.core.anonymization import AGE_CAP, DeidBatch
from clinical_ml.core.reidentification import QUASI_IDENTIFIERS, Remedied, RiskPolicy, RiskSummary

_MODES = {
    "vault": "random surrogate ids, not derived from any identifier; the mapping is kept only in the phi-zone "
    "vault (HIPAA Safe Harbor)",
    "hmac": "keyed HMAC-SHA256 under a secret held outside the data (GDPR pseudonymisation); no lookup table",
}


def _names(cols: list[str]) -> str:
    return ", ".join(f"`{c}`" for c in cols) if cols else "none"


def _counts(by_field: dict[str, int]) -> str:
    return ", ".join(f"`{f}` {n}" for f, n in sorted(by_field.items())) if by_field else "none"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _risk_row(label: str, r: RiskSummary) -> str:
    k = "n/a" if r.k_min is None else str(r.k_min)
    return (
        f"| {label} | {r.records} | {r.classes} | {k} | {r.records_below_k} ({_pct(r.share_below_k)}) "
        f"| {r.max_prosecutor_risk:.3f} | {r.mean_prosecutor_risk:.3f} |"
    )


def _carried_lines(remedied: Remedied) -> list[str]:
    """What became of the people earlier batches held back and this one judged again (none: no line)."""
    c = remedied.carried
    if not (c.patients_released or c.patients_held):
        return []
    return [
        f"- held back by earlier batches, released with this one: {c.patients_released} patients, "
        f"{c.admissions_released} admissions, {c.events_released} events; still held back: {c.patients_held} "
        f"patients, {c.admissions_held} admissions"
    ]


def privacy_summary_markdown(
    *,
    batch_id: str,
    deid: DeidBatch,
    remedied: Remedied,
    published: RiskSummary,
    policy: RiskPolicy,
    max_shift_weeks: int,
    leaks: list[str],
    released_before: int | None = None,
) -> str:
    """Markdown for the asset page of one anonymized batch.

    Parameters
    ----------
    batch_id
        The delivery.
    deid, remedied
        Anonymization and k-anonymity remedies of the batch.
    published
        Risk measured again on the frames actually released (the gate's figure).
    policy
        k and the generalization hierarchy in force.
    max_shift_weeks
        Date-shift range.
    leaks
        Findings of the identifier scan (column-level reasons, no values).
    released_before
        How many batches released before this one the classes were counted with (the cumulative release);
        ``None``: the batch was judged on its own.
    """
    passed = published.meets(policy.k) and not leaks
    free_text = sorted({c for cols in deid.free_text_dropped.values() for c in cols})
    scope = (
        "this batch"
        if released_before is None
        else f"the cumulative release (this batch and the {released_before} batches released before it)"
    )
    counted = "" if released_before is None else f", counted over {scope},"
    verdict = (
        f"**Released**: every class holding a person of this batch{counted} holds at least k = {policy.k} "
        "people, and no identifier was found."
        if passed
        else f"**Withheld**: the release gate failed (k = {published.k_min} against a minimum of {policy.k}"
        f"{'; identifier findings: ' + '; '.join(leaks) if leaks else ''}). Nothing of this batch was "
        "written to the de-identified zone."
    )
    races = "every category kept" if policy.races_kept is None else ", ".join(policy.races_kept)
    lines = [
        f"### Anonymization of batch {batch_id}",
        "",
        verdict,
        "",
        "**Removed** (allowlist: only declared columns pass)",
        f"- patients: {_names(deid.dropped_columns.get('patients', []))}",
        f"- encounters: {_names(deid.dropped_columns.get('encounters', []))}",
        f"- free text dropped, never passed or scrubbed: {_names(free_text)}",
        f"- events of an admission not delivered in this batch (not released): {deid.orphan_events}",
        "",
        "**Coded values** (only controlled values or `unmapped` leave; the delivered text of an unmapped value "
        "stays in the phi zone)",
        f"- leaving as `unmapped`, per field: {_counts(deid.unmapped_released)}",
        f"- not controlled values on reaching the boundary (made `unmapped` here): {_counts(deid.unmapped_at_boundary)}",
        "",
        "**Pseudonymized**",
        f"- {_MODES[deid.pseudonym_mode]}; the same patient keeps one pseudonym across batches and sources",
        f"- new patients this batch: {deid.new_pseudonyms}",
        "",
        "**Generalized**",
        f"- dates shifted per patient by whole weeks (1 to {max_shift_weeks}, either direction): weekday and "
        "every interval within a patient kept; the real year-quarter of admission kept as `period`",
        f"- ages {AGE_CAP} and over released as {AGE_CAP} (read {AGE_CAP}+): {deid.ages_capped} admissions",
        f"- ZIP cut to 3 digits; restricted prefixes (population 20,000 or less) set to 000: {deid.zip3_restricted} "
        "patients",
        f"- race outside ({races}) released as Other: {remedied.race_generalized} patients",
        f"- age bands for the risk measure: {', '.join(str(a) for a in policy.age_bands)} (lower edges)",
        "",
        f"**Suppressed** (people still in classes smaller than k = {policy.k})",
        f"- ZIP3 withheld (set to 000): {remedied.zip3_suppressed} patients",
        f"- payer withheld (Unknown), too rare among people alike in the other attributes: "
        f"{remedied.payer_suppressed} patients",
        f"- race and ethnicity withheld (Unknown): {remedied.race_suppressed} patients",
        (
            f"- withheld from this batch entirely: {remedied.subjects_withheld} patients, "
            f"{remedied.admissions_withheld} admissions, {remedied.events_withheld} events"
            if released_before is None
            else f"- held back (kept in the phi zone, judged again with each later batch): "
            f"{remedied.subjects_withheld} patients, {remedied.admissions_withheld} admissions, "
            f"{remedied.events_withheld} events"
        ),
        *_carried_lines(remedied),
        "",
        f"**Re-identification risk** over {', '.join(QUASI_IDENTIFIERS)} (prosecutor model: the attacker knows "
        f"the person is in the release and knows these attributes; classes counted in distinct people, over "
        f"{scope}; the figures describe this batch's records)",
        "",
        "| release | records | classes | k (smallest class) | records in classes below k | max risk | mean risk |",
        "|---|---|---|---|---|---|---|",
        _risk_row("before remedies (ages in bands only)", remedied.before),
        _risk_row("published", published),
        "",
        f"Exact age in years (below {AGE_CAP}) and shifted dates are released within these classes, as Safe "
        "Harbor allows."
        + (
            " The measure is per batch."
            if released_before is None
            else " A person released earlier is never changed; an attacker who knows in which delivery a "
            "person's stay arrived is outside this model (set risk_scope to 'batch' to defend against one)."
        ),
    ]
    if deid.pseudonym_mode != "vault":
        lines.remove(f"- new patients this batch: {deid.new_pseudonyms}")
    return "\n".join(lines)
