"""The clinical panel's sign-off: a challenger that passed the promotion gate becomes champion only after a
recorded approval (who, when, decision, note, the sha256 of the report card they read), unless its use case
says ``promotion.approval: automatic`` and its subcohort fairness verdict is pass.

The sign-off is a decision of its own in the registry's decision log (framed and checksummed like every
decision), and the exact report card the panel read is kept beside the model version, so the sha256 they
signed can be checked against it later.
"""

import hashlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.core.registry import PromotionDecision, Registry
from clinical_ml.core.storage import atomic_write_bytes

SIGNED_REPORT_CARD = "report_card_signed.html"
MAX_NAME = 120
MAX_NOTE = 1000


class SignOffError(ValueError):
    """A sign-off that cannot be recorded (nothing awaits it, no report card was read, no name given)."""


@dataclass(frozen=True)
class SignOff:
    """One panel decision on one model version."""

    by: str
    approved: bool
    note: str
    report_card_sha256: str
    at: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "SignOff":
        return cls(
            str(d["by"]), bool(d["approved"]), str(d["note"]), str(d["report_card_sha256"]), str(d["at"])
        )

    def sentence(self) -> str:
        what = "approved" if self.approved else "rejected"
        note = f": {self.note}" if self.note else ""
        return f"{what} by {self.by} on {self.at[:10]}{note} (report card read: sha256 {self.report_card_sha256[:12]})"


def apply_approval_policy(
    decision: PromotionDecision, *, approval: str, fairness_verdict: str | None
) -> PromotionDecision:
    """The gate's decision under the use case's approval rule: a passed gate waits for the panel unless
    approval is automatic and the fairness verdict is pass. A refusal stays a refusal."""
    if not decision.promoted:
        return decision
    if approval == "automatic" and fairness_verdict == "pass":
        return decision
    if approval == "automatic":
        why = (
            f"the subcohort fairness verdict is '{fairness_verdict}'"
            if fairness_verdict
            else "no subcohort fairness verdict was recorded for this model"
        ) + ", so automatic promotion is blocked: it becomes champion when the clinical panel signs off"
    else:
        why = "the gate passed; it becomes champion when the clinical panel signs off (promotion.approval: panel)"
    return replace(decision, promoted=False, awaiting_sign_off=True, reasons=(*decision.reasons, why))


def pending_version(registry: Registry) -> str | None:
    """The newest model version whose last decision awaits the panel's sign-off, if any."""
    last: dict[str, PromotionDecision] = {}
    for d in registry.decisions():
        last[d.challenger] = d
    waiting = [v for v, d in last.items() if d.awaiting_sign_off]
    return waiting[-1] if waiting else None


def sign_off(
    registry: Registry,
    store: UseCaseStore,
    *,
    by: str,
    approve: bool,
    note: str = "",
    version: str | None = None,
    now: datetime | None = None,
) -> PromotionDecision:
    """Record the panel's decision on ``version`` (default: the newest awaiting sign-off) and, when it
    approves, make it champion. The report card of that version must exist (the panel signs what it read):
    its sha256 is recorded and the file is kept beside the model version.

    Raises
    ------
    SignOffError
        No name given, a note too long, no model awaiting sign-off, the version not awaiting it (refused by
        the gate, or already decided), or its report card not written yet.
    """
    by, note = " ".join(by.split()), " ".join(note.split())
    if not by:
        raise SignOffError("a sign-off needs the name of who signs (--by)")
    if len(by) > MAX_NAME or len(note) > MAX_NOTE:
        raise SignOffError(f"the name may have at most {MAX_NAME} characters and the note {MAX_NOTE}")
    version = version or pending_version(registry)
    if version is None:
        raise SignOffError(f"no model of {registry.use_case} awaits sign-off")
    history = [d for d in registry.decisions() if d.challenger == version]
    if not history:
        raise SignOffError(
            f"model {version} of {registry.use_case} has no recorded decision: it was never judged"
        )
    last = history[-1]
    if not last.awaiting_sign_off:
        state = (
            "it was already signed off"
            if last.sign_off
            else "the promotion gate refused it ("
            + "; ".join(last.reasons[:3])
            + "); a refused model cannot be approved"
        )
        raise SignOffError(f"model {version} does not await sign-off: {state}")
    card = store.reports.report(f"report_card_{version}")
    if not card.exists():
        raise SignOffError(
            f"the report card of model {version} has not been written: materialize model_report_card and read "
            "it first; the sign-off records the sha256 of the card read"
        )
    content = card.read_bytes()
    atomic_write_bytes(registry.version_dir(version) / SIGNED_REPORT_CARD, content)
    record = SignOff(
        by=by,
        approved=approve,
        note=note,
        report_card_sha256=hashlib.sha256(content).hexdigest(),
        at=(now or datetime.now(UTC)).isoformat(),
    )
    decision = PromotionDecision(
        approve,
        version,
        registry.champion(),
        (f"signed off: {record.sentence()}",),
        last.criteria,
        sign_off=record.as_dict(),
    )
    recorded = registry.record_decision(decision, move_pointer=True)
    if store.decision.exists() and store.decision.read().challenger == version:
        store.decision.write(recorded)
    return recorded
