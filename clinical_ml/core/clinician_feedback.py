"""Clinician feedback on the point-of-care cards, taken across the anonymization boundary and monitored.

The CDS Hooks service (:mod:`clinical_ml.serve`) records, in the phi zone, each card it served (the EHR's
patient and encounter ids, the card's uuid, model version, risk, band) and each feedback entry (the card's
uuid, accepted or overridden, the override reason's code, the clinician's free-text comment).
:func:`pseudonymise_feedback` joins the two and releases, per card answered, one de-identified row:

* ``subject_id`` / ``hadm_id``: the pseudonyms anonymization gives the EHR's patient id (taken as the MRN)
  and encounter id, from the vault (vault mode; null while the vault does not know the patient yet, i.e.
  before the stay's first batch) or keyed HMAC (hmac mode, always known);
* ``outcome`` (``accepted`` / ``overridden``), ``override_reason``: a code the use case offers, ``unmapped``
  for anything else (the service's ``not_offered``, an unknown code), null when none was given;
* ``model_version``, ``risk``, ``risk_band`` (the card's indicator: info, warning, critical) of the card;
* ``period``: the real year-quarter the feedback came in, as the boundary keeps the admission's.

What never crosses: the EHR's ids, the card's uuid (a key back into the phi zone), every time stamp (only
the quarter), and the clinician's comment (free text: it stays in the phi zone, whatever it says). Patients
of the opt-out register are left out (:func:`clinical_ml.core.consent.read_register` normalizes its MRNs as
the pseudonyms are keyed). The release is rebuilt from the whole phi record each time: same records, same
rows; a patient the vault learns later gets its pseudonyms at the next run.

:func:`feedback_monitoring` turns the released rows into acceptance and override rates with Wilson 95%
intervals and override reasons, overall and by unit, subgroup, risk band, period and model version, with
every count from 1 to ``min_cell_size - 1`` masked; :func:`rising_override` is the rule the monitoring
check applies.
"""

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.pseudonyms import HmacKey, hmac_ids, normalize_identifier
from clinical_ml.core.reports import md_escape
from clinical_ml.core.storage import committed

UNMAPPED = "unmapped"
NOT_RELEASED = "not yet released"
OUTCOMES = ("accepted", "overridden")
BANDS = ("info", "warning", "critical")
FEEDBACK_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "hadm_id": pl.Int64(),
    "model_version": pl.String(),
    "outcome": pl.String(),
    "override_reason": pl.String(),
    "risk": pl.Float64(),
    "risk_band": pl.String(),
    "period": pl.String(),
}
# the stay's attributes a feedback row is grouped by, from the use case's de-identified cohort
STAY_ATTRIBUTES = ("unit", "sex", "race_ethnicity", "age_band", "site")
Z95 = 1.959963984540054


# reading the phi zone's records ---------------------------------------------------------------------------
@dataclass(frozen=True)
class JsonLines:
    """The records of one kind (every ``*.jsonl`` of a folder, oldest day first) and how many lines could not
    be read (e.g. the last line of a write cut short): counted, never quoted."""

    records: list[dict]
    unreadable: int = 0


def read_json_lines(folder: Path) -> JsonLines:
    records, bad = [], 0
    for path in committed(folder, ".jsonl"):
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(value, dict):
                records.append(value)
            else:
                bad += 1
    return JsonLines(records, bad)


# across the boundary ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeedbackRelease:
    """The de-identified feedback rows and where every phi record went (counts only)."""

    frame: pl.DataFrame
    received: int = 0
    released: int = 0
    withheld_by_consent: int = 0
    card_not_served: int = 0  # feedback on a card no prediction record names
    repeated: int = 0  # earlier answers on the same card, superseded by the latest
    without_pseudonym: int = 0  # released without subject_id/hadm_id: the vault does not know the patient yet
    reasons_unmapped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "frame"}

    def sentence(self) -> str:
        return (
            f"{self.released} of {self.received} feedback entries released "
            f"({self.withheld_by_consent} withheld by consent, {self.card_not_served} on a card not recorded "
            f"as served, {self.repeated} superseded by a later answer on the same card); "
            f"{self.without_pseudonym} released without pseudonyms (patient not yet known to the vault)."
        )


def _frame(records: list[dict], columns: dict[str, pl.DataType]) -> pl.DataFrame:
    rows = [{c: r.get(c) for c in columns} for r in records]
    return pl.DataFrame(rows, schema=columns, strict=False)


def _quarter(ts: pl.Expr) -> pl.Expr:
    t = ts.str.to_datetime(time_zone="UTC", strict=False)
    return pl.format("{}Q{}", t.dt.year(), t.dt.quarter())


def with_pseudonyms(
    rows: pl.DataFrame, *, vault: Vault, hmac_key: HmacKey | None, opted_out: pl.Series
) -> tuple[pl.DataFrame, int]:
    """Rows with the EHR's ``patient_id`` and ``encounter_id`` given the pseudonyms anonymization gives them
    (``subject_id``, ``hadm_id``: keyed HMAC in hmac mode, the vault's in vault mode, in pairs or not at all),
    those of the opt-out register left out; and how many were left out. The EHR's ids stay in the rows
    (``_mrn``/``_enc`` normalized): the caller selects what leaves."""
    rows = rows.with_columns(
        normalize_identifier(pl.col("patient_id")).alias("_mrn"),
        normalize_identifier(pl.col("encounter_id")).alias("_enc"),
    )
    objecting = rows["_mrn"].is_in(opted_out.implode())
    withheld = int(objecting.sum())
    rows = rows.filter(~objecting)
    if hmac_key is not None:
        rows = rows.with_columns(
            hmac_ids(rows["_mrn"], key=hmac_key, kind="subject").alias("subject_id"),
            hmac_ids(rows["_enc"], key=hmac_key, kind="hadm").alias("hadm_id"),
        )
    else:
        rows = rows.join(
            vault.patients.select(pl.col("mrn").alias("_mrn"), "subject_id"), on="_mrn", how="left"
        ).join(
            vault.encounters.select(pl.col("encounter_id").alias("_enc"), "hadm_id"), on="_enc", how="left"
        )
        # pseudonyms leave in pairs: a patient the vault knows without this stay (or the reverse) gets none
        rows = rows.with_columns(
            pl.when(pl.col("hadm_id").is_null())
            .then(None)
            .otherwise(pl.col("subject_id"))
            .alias("subject_id"),
            pl.when(pl.col("subject_id").is_null()).then(None).otherwise(pl.col("hadm_id")).alias("hadm_id"),
        )
    return rows, withheld


def quarter(ts: pl.Expr) -> pl.Expr:
    """The real year-quarter (``2026Q1``) of an ISO time stamp column, UTC."""
    return _quarter(ts)


def pseudonymise_feedback(
    predictions: Sequence[dict],
    feedback: Sequence[dict],
    *,
    offered_reasons: Collection[str],
    vault: Vault,
    hmac_key: HmacKey | None,
    opted_out: pl.Series,
) -> FeedbackRelease:
    """The phi zone's feedback records as de-identified rows (:data:`FEEDBACK_SCHEMA`).

    Parameters
    ----------
    predictions, feedback
        The service's records (:mod:`clinical_ml.serve.records`), in any order.
    offered_reasons
        The override-reason codes the use case's cards offer; any other reason leaves as ``unmapped``.
    vault
        The pseudonym vault (vault mode); ignored when ``hmac_key`` is given.
    hmac_key
        The key of the hmac pseudonym mode, ``None`` in vault mode.
    opted_out
        Normalized MRNs of the opt-out register (:func:`clinical_ml.core.consent.read_register`).
    """
    fb = _frame(
        list(feedback),
        {
            "card_uuid": pl.String(),
            "outcome": pl.String(),
            "override_reason": pl.String(),
            "received_at": pl.String(),
        },
    )
    received = fb.height
    # one answer per card: the latest (an EHR may resend, a clinician may change their mind)
    fb = fb.with_row_index("_order").sort("received_at", "_order").unique("card_uuid", keep="last")
    repeated = received - fb.height
    served = _frame(
        list(predictions),
        {
            "card_uuid": pl.String(),
            "patient_id": pl.String(),
            "encounter_id": pl.String(),
            "model_version": pl.String(),
            "risk": pl.Float64(),
            "indicator": pl.String(),
        },
    ).unique("card_uuid", keep="last", maintain_order=True)
    rows = fb.join(served, on="card_uuid", how="inner")
    not_served = fb.height - rows.height
    rows, withheld = with_pseudonyms(rows, vault=vault, hmac_key=hmac_key, opted_out=opted_out)
    offered = sorted(set(offered_reasons))
    reason = pl.col("override_reason")
    unmapped = reason.is_not_null() & ~reason.is_in(offered)
    out = rows.sort("received_at", "_order").select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("hadm_id").cast(pl.Int64),
        pl.col("model_version").cast(pl.String),
        pl.when(pl.col("outcome").is_in(OUTCOMES)).then(pl.col("outcome")).otherwise(pl.lit(UNMAPPED)),
        pl.when(unmapped).then(pl.lit(UNMAPPED)).otherwise(reason).alias("override_reason"),
        pl.col("risk").cast(pl.Float64),
        pl.when(pl.col("indicator").is_in(BANDS))
        .then(pl.col("indicator"))
        .otherwise(pl.lit(None))
        .alias("risk_band"),
        _quarter(pl.col("received_at")).alias("period"),
    )
    out = out.cast(FEEDBACK_SCHEMA)  # type: ignore[arg-type]
    return FeedbackRelease(
        frame=out,
        received=received,
        released=out.height,
        withheld_by_consent=withheld,
        card_not_served=not_served,
        repeated=repeated,
        without_pseudonym=int(out["subject_id"].is_null().sum()),
        reasons_unmapped=int(rows.select(unmapped.sum()).item()),
    )


def no_feedback() -> pl.DataFrame:
    """The released table before the first feedback run: no rows."""
    return pl.DataFrame(schema=FEEDBACK_SCHEMA)


# monitoring -----------------------------------------------------------------------------------------------
def wilson(k: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (``(nan, nan)`` when n is 0)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def small(count: int, min_cell_size: int) -> bool:
    """A count that would single out fewer than ``min_cell_size`` people (zero is not small)."""
    return 0 < count < min_cell_size


@dataclass(frozen=True)
class FeedbackGroup:
    """Feedback of one group: counts, and rates only where no count behind them is small."""

    dimension: str
    group: str
    answered: int | None  # None: masked
    accepted: int | None
    overridden: int | None
    override_rate: float | None
    ci_low: float | None
    ci_high: float | None
    reasons: dict[str, int | None] = field(default_factory=dict)  # None: masked

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _group(dimension: str, group: str, rows: pl.DataFrame, k: int) -> FeedbackGroup:
    n = rows.height
    over = int((rows["outcome"] == "overridden").sum())
    acc = int((rows["outcome"] == "accepted").sum())
    counts = rows.filter(pl.col("override_reason").is_not_null())["override_reason"].value_counts()
    reasons = {str(r): int(c) for r, c in counts.iter_rows()}
    if small(n, k):
        return FeedbackGroup(dimension, group, None, None, None, None, None, None, {})
    shown = n > 0 and not (small(over, k) or small(n - over, k))
    lo, hi = wilson(over, n)
    return FeedbackGroup(
        dimension,
        group,
        n,
        None if small(acc, k) else acc,
        None if small(over, k) else over,
        over / n if shown else None,
        lo if shown else None,
        hi if shown else None,
        {r: (None if small(c, k) else c) for r, c in sorted(reasons.items())},
    )


@dataclass(frozen=True)
class RisingOverride:
    """The rule of the ``override_rate_not_rising`` check and what it found.

    Rule: the newest period's override rate is judged against the pooled rate of all earlier periods; it is
    rising when the Wilson 95% interval of the newest period lies wholly above the earlier rate. It is
    judged only when both the newest period and the earlier ones hold at least ``min_cell_size`` answers.
    """

    judged: bool
    rising: bool
    period: str | None = None
    answered: int = 0
    rate: float | None = None
    ci: tuple[float, float] | None = None
    earlier_rate: float | None = None
    earlier_answered: int = 0
    why_not_judged: str = ""

    def sentence(self) -> str:
        if not self.judged:
            return f"override rate not judged: {self.why_not_judged}"
        assert self.rate is not None and self.ci is not None and self.earlier_rate is not None
        verdict = "rising" if self.rising else "not rising"
        relation = "wholly above" if self.rising else "not wholly above"
        return (
            f"override rate {verdict}: {self.period} {self.rate:.1%} (95% CI {self.ci[0]:.1%} to "
            f"{self.ci[1]:.1%}, {self.answered} answers) is {relation} the earlier periods' "
            f"{self.earlier_rate:.1%} ({self.earlier_answered} answers)"
        )


def rising_override(feedback: pl.DataFrame, *, min_cell_size: int) -> RisingOverride:
    """Whether the newest period's override rate rose above the earlier periods' (see :class:`RisingOverride`)."""
    rows = feedback.filter(pl.col("outcome").is_in(OUTCOMES) & pl.col("period").is_not_null())
    periods = sorted(rows["period"].unique().to_list())
    if len(periods) < 2:
        return RisingOverride(False, False, why_not_judged=f"{len(periods)} period(s) of feedback, 2 needed")
    last = periods[-1]
    now, before = rows.filter(pl.col("period") == last), rows.filter(pl.col("period") != last)
    if now.height < min_cell_size or before.height < min_cell_size:
        return RisingOverride(
            False,
            False,
            period=last,
            why_not_judged=f"fewer than {min_cell_size} answers in {last} or in the earlier periods",
        )
    k = int((now["outcome"] == "overridden").sum())
    lo, hi = wilson(k, now.height)
    earlier = float((before["outcome"] == "overridden").mean())  # type: ignore[arg-type]
    return RisingOverride(
        True,
        lo > earlier,
        period=last,
        answered=now.height,
        rate=k / now.height,
        ci=(lo, hi),
        earlier_rate=earlier,
        earlier_answered=before.height,
    )


@dataclass(frozen=True)
class FeedbackMonitoring:
    groups: tuple[FeedbackGroup, ...]
    rising: RisingOverride
    min_cell_size: int
    reasons: tuple[str, ...]

    def overall(self) -> FeedbackGroup:
        return self.groups[0]

    def by(self, dimension: str) -> list[FeedbackGroup]:
        return [g for g in self.groups if g.dimension == dimension]

    def metadata(self) -> dict[str, float | int]:
        """Numbers for the asset's metadata (masked ones left out)."""
        o = self.overall()
        out: dict[str, float | int] = {"feedback_answered": o.answered or 0}
        if o.override_rate is not None:
            out["override_rate"] = o.override_rate
        if self.rising.rate is not None:
            out["override_rate_last_period"] = self.rising.rate
        return out


def with_stays(feedback: pl.DataFrame, cohort: pl.DataFrame | None) -> pl.DataFrame:
    """The feedback rows with their stay's unit and subgroups from the use case's de-identified cohort;
    stays not (yet) in it are grouped as :data:`NOT_RELEASED`."""
    have = [c for c in STAY_ATTRIBUTES if cohort is not None and c in cohort.columns]
    if cohort is None or not have or "hadm_id" not in cohort.columns:
        stays = pl.DataFrame(schema={"hadm_id": pl.Int64})
    else:
        stays = cohort.select("hadm_id", *have).unique("hadm_id", keep="first", maintain_order=True)
    out = feedback.join(stays, on="hadm_id", how="left")
    return out.with_columns(
        pl.col(c).cast(pl.String).fill_null(NOT_RELEASED)
        if c in out.columns
        else pl.lit(NOT_RELEASED).alias(c)
        for c in STAY_ATTRIBUTES
    )


def feedback_monitoring(
    feedback: pl.DataFrame,
    cohort: pl.DataFrame | None,
    *,
    attributes: Iterable[str],
    min_cell_size: int,
    offered_reasons: Sequence[str] = (),
) -> FeedbackMonitoring:
    """Acceptance and override rates and reasons, overall and by unit, each subgroup attribute, risk band,
    period and model version (small cells masked), and the rising-override rule's finding."""
    rows = with_stays(feedback, cohort).with_columns(
        pl.col("risk_band").fill_null("not scored"),
        pl.col("period").fill_null("unknown"),
        pl.col("model_version").fill_null("unknown"),
    )
    dims = ["unit", *[a for a in attributes if a in STAY_ATTRIBUTES and a != "unit"]]
    dims += ["risk_band", "period", "model_version"]
    groups = [_group("overall", "all", rows, min_cell_size)]
    for d in dims:
        for value in sorted(rows[d].unique().to_list(), key=str):
            groups.append(_group(d, str(value), rows.filter(pl.col(d) == value), min_cell_size))
    seen = {r for g in groups for r in g.reasons}
    reasons = tuple(dict.fromkeys([*offered_reasons, *sorted(seen)]))
    return FeedbackMonitoring(
        tuple(groups), rising_override(feedback, min_cell_size=min_cell_size), min_cell_size, reasons
    )


def _cell(v: int | None, k: int) -> str:
    return f"<{k}" if v is None else str(v)


def _pct(v: float | None) -> str:
    return "masked" if v is None else f"{v:.1%}"


DIMENSION_WORDS = {
    "overall": "All cards answered",
    "unit": "By unit",
    "sex": "By sex",
    "race_ethnicity": "By race and ethnicity",
    "age_band": "By age band",
    "site": "By site",
    "risk_band": "By risk band (the card's indicator)",
    "period": "Over time (year-quarter the answer came in)",
    "model_version": "By model version",
}


def masking_note(min_cell_size: int) -> str:
    k = min_cell_size
    return (
        f"Counts from 1 to {k - 1} are shown as <{k}, and a rate is shown only where neither its overrides nor "
        "its acceptances are such a count. Rates are overrides per card answered, with Wilson 95% intervals; "
        f"unit and subgroups are those of the stay in the de-identified cohort ('{NOT_RELEASED}' until its "
        "batch is delivered)."
    )


def feedback_sections(m: FeedbackMonitoring) -> list[dict]:
    """Each dimension's title and rows of display cells (group, answered, accepted, overridden, rate with
    its interval, then one per reason), masked cells already in words: what the Markdown and the HTML show."""
    k = m.min_cell_size
    sections = []
    for dim in dict.fromkeys(g.dimension for g in m.groups):
        rows = []
        for g in m.by(dim):
            if g.answered is None:
                cells = [f"<{k}", "masked", "masked", "masked"] + ["masked"] * len(m.reasons)
            else:
                ci = "" if g.ci_low is None or g.ci_high is None else f" ({g.ci_low:.1%} to {g.ci_high:.1%})"
                cells = [_cell(g.answered, k), _cell(g.accepted, k), _cell(g.overridden, k)]
                cells += [_pct(g.override_rate) + ci] + [_cell(g.reasons.get(r, 0), k) for r in m.reasons]
            rows.append({"group": g.group, "cells": cells})
        sections.append({"title": DIMENSION_WORDS.get(dim, dim), "rows": rows})
    return sections


FEEDBACK_COLUMNS = ("answered", "accepted", "overridden", "override rate (95% CI)")


def feedback_view(m: FeedbackMonitoring) -> dict:
    """What the monitoring report's feedback section shows (plain values; the template escapes them)."""
    return {
        "rising": m.rising.rising,
        "rising_sentence": m.rising.sentence(),
        "note": masking_note(m.min_cell_size),
        "columns": [*FEEDBACK_COLUMNS, *m.reasons],
        "sections": feedback_sections(m),
    }


def feedback_markdown(m: FeedbackMonitoring) -> str:
    """The monitoring numbers as Markdown tables (every value escaped)."""
    if m.overall().answered == 0:
        return "No clinician feedback recorded yet."
    view = feedback_view(m)
    parts = [f"**{md_escape(view['rising_sentence'])}**\n", md_escape(view["note"]) + "\n"]
    head = "| group | " + " | ".join(md_escape(c) for c in view["columns"]) + " |"
    rule = "|---" * (1 + len(view["columns"])) + "|"
    for section in view["sections"]:
        parts.append(f"\n**{md_escape(section['title'])}**\n\n{head}\n{rule}")
        for row in section["rows"]:
            parts.append(
                f"| {md_escape(row['group'])} | " + " | ".join(md_escape(c) for c in row["cells"]) + " |"
            )
    return "\n".join(parts) + "\n"
