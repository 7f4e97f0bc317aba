"""Where every delivered row of a batch went, in counts a user reads: delivered, accepted, rejected (by reason),
withheld by the privacy gate, released into the de-identified layer.

Built from the ledger entries ingestion writes per source (``archive/ledger/<batch>/<source>.json``) and the
privacy record anonymization writes per batch (``deid/privacy/<batch>.json``): counts and reason codes only,
never a delivered value. The CLI prints it after each batch, so a run never says "succeeded" alone when rows
were rejected or withheld.
"""

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from clinical_ml.core.delivery import ZonePaths, read_ledger_entry
from clinical_ml.core.landing import IMAGING_SOURCE, OPTIONAL_SOURCES, SOURCES


@dataclass(frozen=True)
class SourceAccount:
    """One source file of a batch."""

    source: str
    status: str  # accepted, quarantined, missing, not_delivered, ...
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    rejected_by_reason: tuple[tuple[str, int], ...]  # most frequent first

    @property
    def accounted(self) -> bool:
        return self.rows_in == self.rows_accepted + self.rows_rejected

    def words(self, *, top: int = 3) -> str:
        if self.status not in ("accepted", "ok") and self.rows_in == 0:
            return f"{self.source} {self.status.replace('_', ' ')}"
        text = f"{self.source} {self.rows_in:,} delivered, {self.rows_accepted:,} accepted"
        if self.rows_rejected:
            reasons = ", ".join(f"{n:,} {r}" for r, n in self.rejected_by_reason[:top])
            more = len(self.rejected_by_reason) - top
            text += (
                f", {self.rows_rejected:,} rejected ({reasons}{f', {more} more reasons' if more > 0 else ''})"
            )
        return text


@dataclass(frozen=True)
class BatchAccount:
    """A batch's rows from delivery to the de-identified layer."""

    batch_id: str
    sources: tuple[SourceAccount, ...]
    released: bool | None  # the privacy gate's verdict (None: anonymization has not run)
    admissions_withheld: int
    events_withheld: int
    admissions_released: int | None
    consent_admissions: int = 0  # admissions of patients of the opt-out register, kept in the phi zone
    consent_events: int = 0
    held_back: bool = False
    """Under the cumulative risk scope the people withheld are held back in the phi zone and judged again with
    each later delivery (core.holdback); under the per-batch scope they are withheld for good."""
    released_from: dict[str, int] = field(default_factory=dict)
    """Admissions of earlier deliveries, held back there, released with this batch (per delivery); not in
    ``admissions_released``, which counts this delivery's own."""

    @property
    def rows_rejected(self) -> int:
        return sum(s.rows_rejected for s in self.sources)

    @property
    def clean(self) -> bool:
        """Nothing of this delivery rejected, withheld or quarantined, and the batch released (admissions of
        earlier deliveries released with it are good news, not a reason to say rows were withheld)."""
        return (
            self.released is True
            and self.rows_rejected == 0
            and self.admissions_withheld == 0
            and self.events_withheld == 0
            and self.consent_admissions == 0
            and self.consent_events == 0
            and all(s.status in ("accepted", "ok", "not_delivered") for s in self.sources)
        )

    def lines(self) -> list[str]:
        """Plain-word lines for the CLI: one per source, then the privacy gate."""
        out = [f"  {s.words()}" for s in self.sources]
        if self.released is None:
            out.append("  not anonymized yet")
        elif not self.released:
            out.append("  withheld by the privacy gate: nothing of this batch was released")
        else:
            held = (
                "held back",
                " so far (kept in the phi zone; released with a later delivery once enough patients alike "
                "have been)",
            )
            verb, until = held if self.held_back else ("withheld", "")
            withheld = (
                f"; the privacy gate {verb} {self.admissions_withheld:,} admissions "
                f"({self.events_withheld:,} events) of patients too easy to single out{until}"
                if self.admissions_withheld or self.events_withheld
                else ""
            )
            later = sum(self.released_from.values())
            if later:
                withheld += (
                    f"; also released now: {later:,} admissions held back by earlier deliveries "
                    f"({', '.join(sorted(self.released_from))})"
                )
            released = (
                f"{self.admissions_released:,} admissions" if self.admissions_released is not None else ""
            )
            consent = (
                f"; withheld by consent (the opt-out register): {self.consent_admissions:,} admissions "
                f"({self.consent_events:,} events)"
                if self.consent_admissions or self.consent_events
                else ""
            )
            out.append(f"  released to the de-identified layer: {released}{withheld}{consent}")
        return out

    def as_dict(self) -> dict:
        return {
            "batch_id": self.batch_id,
            "sources": [
                {**s.__dict__, "rejected_by_reason": dict(s.rejected_by_reason)} for s in self.sources
            ],
            "released": self.released,
            "admissions_withheld": self.admissions_withheld,
            "events_withheld": self.events_withheld,
            "admissions_released": self.admissions_released,
            "consent_admissions": self.consent_admissions,
            "consent_events": self.consent_events,
            "held_back": self.held_back,
            "released_from": dict(self.released_from),
        }


def _source_account(entry: dict | None, source: str) -> SourceAccount:
    if entry is None:
        return SourceAccount(source, "not_recorded", 0, 0, 0, ())
    reasons = sorted(
        ((str(r), int(n)) for r, n in (entry.get("rejected_by_reason") or {}).items()),
        key=lambda x: (-x[1], x[0]),
    )
    return SourceAccount(
        source,
        str(entry.get("status", "")),
        int(entry.get("rows_in") or 0),
        int(entry.get("rows_accepted") or 0),
        int(entry.get("rows_rejected") or 0),
        tuple(reasons),
    )


def batch_account(zones: ZonePaths, deid_root: Path, batch_id: str) -> BatchAccount:
    """The batch's account from its ledger entries and privacy record (sources never delivered and
    optional ones left out are shown as such)."""
    entries = {s: read_ledger_entry(zones, batch_id, s) for s in (*SOURCES, IMAGING_SOURCE)}
    # an optional source (labels, medications, ..., imaging, whose rows are files) is listed only when delivered
    sources = tuple(
        _source_account(entry, s)
        for s, entry in entries.items()
        if entry is not None or s not in (*OPTIONAL_SOURCES, IMAGING_SOURCE)
    )
    privacy_file = Path(deid_root) / "privacy" / f"{batch_id}.json"
    privacy = json.loads(privacy_file.read_text()) if privacy_file.is_file() else None
    if privacy is None:
        return BatchAccount(batch_id, sources, None, 0, 0, None)
    published = privacy.get("published") or {}
    later = {
        str(b): int(n)
        for b, n in (
            (privacy.get("held_back_from_earlier") or {}).get("admissions_released_by_batch") or {}
        ).items()
    }
    return BatchAccount(
        batch_id,
        sources,
        bool(privacy.get("released")),
        int(privacy.get("admissions_withheld") or 0),
        int(privacy.get("events_withheld") or 0),
        int(published["records"]) - sum(later.values())
        if privacy.get("released") and "records" in published
        else None,
        int((privacy.get("withheld_by_consent") or {}).get("admissions") or 0),
        int((privacy.get("withheld_by_consent") or {}).get("events") or 0),
        privacy.get("risk_scope") == "cumulative",
        later if privacy.get("released") else {},
    )


def delivery_rows(accounts: list[dict], in_cohort: dict[str, int]) -> list[dict]:
    """One row per delivery for the report card's participant flow, in admissions (encounter rows):
    delivered, accepted, rejected (with the most frequent reasons), withheld by the privacy gate, released,
    and in this use case's cohort. ``accounts`` are :meth:`BatchAccount.as_dict` records.

    An admission the privacy gate held back and a later delivery released counts as released in the row of
    the delivery it came in (``released_later`` says how many), not as withheld."""
    later: dict[str, int] = {}
    for a in accounts:
        for origin, n in (a.get("released_from") or {}).items():
            later[origin] = later.get(origin, 0) + int(n)
    rows = []
    for a in accounts:
        enc: dict = next((s for s in a.get("sources", []) if s.get("source") == "encounters"), {})
        reasons = sorted((enc.get("rejected_by_reason") or {}).items(), key=lambda x: (-x[1], x[0]))
        rows.append(
            {
                "batch_id": a["batch_id"],
                "delivered": int(enc.get("rows_in") or 0),
                "accepted": int(enc.get("rows_accepted") or 0),
                "rejected": int(enc.get("rows_rejected") or 0),
                "reasons": ", ".join(f"{n} {r}" for r, n in reasons[:3]),
                "withheld": int(a.get("admissions_withheld") or 0) - later.get(a["batch_id"], 0)
                if a.get("released")
                else None,
                "released": (a.get("admissions_released") or 0) + later.get(a["batch_id"], 0)
                if a.get("released")
                else 0,
                "released_later": later.get(a["batch_id"], 0),
                "held_back": bool(a.get("held_back")),
                "in_cohort": int(in_cohort.get(a["batch_id"], 0)),
            }
        )
    return rows


PRIVACY_LOSS_LIMIT = 0.05
"""Share of an audited group the privacy gate may take from the subcohort audit before the report card
flags it (issue goal: no audited group loses more than 5% of its members)."""


def privacy_by_group(records: list[dict], *, attributes: Collection[str] | None = None) -> list[dict]:
    """What the privacy remedies took from each audited group over the batches of ``records`` (privacy
    records, ``audited_groups``): patients delivered (once per batch they arrive in), withheld, released
    without race (lost to the race/ethnicity audit only) or without payer (lost to the payer audit only), the
    share lost to that attribute's audit, and whether it is over :data:`PRIVACY_LOSS_LIMIT`. Records written
    before the counts existed are skipped; with ``attributes`` (a use case's), only the attributes it audits.

    ``withheld`` is net: people held back by one batch and released by a later one (``released_later``, in
    the later batch's counts) are not lost."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for record in records:
        for attribute, groups in (record.get("audited_groups") or {}).items():
            if attributes is not None and attribute not in attributes:
                continue
            for group, counts in groups.items():
                t = totals.setdefault(
                    (attribute, group),
                    {
                        "patients": 0,
                        "withheld": 0,
                        "released_later": 0,
                        "race_not_released": 0,
                        "payer_not_released": 0,
                    },
                )
                for k in t:
                    t[k] += int(counts.get(k) or 0)
    rows = []
    for (attribute, group), t in sorted(totals.items()):
        t["withheld"] -= t["released_later"]
        outside = {"race_ethnicity": "race_not_released", "payer": "payer_not_released"}.get(attribute)
        lost = t["withheld"] + (t[outside] if outside else 0)
        share = lost / t["patients"] if t["patients"] else 0.0
        rows.append(
            {
                "attribute": attribute,
                "group": group,
                **t,
                "lost": lost,
                "share_lost": share,
                "over_limit": share > PRIVACY_LOSS_LIMIT,
            }
        )
    return rows
