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
from clinical_ml.core.display_names import attribute_title
from clinical_ml.core.registry import PromotionDecision, Registry
from clinical_ml.core.storage import atomic_write_bytes

SIGNED_REPORT_CARD = "report_card_signed.html"
MAX_NAME = 120
MAX_NOTE = 1000


class SignOffError(ValueError):
    """A sign-off that cannot be recorded (nothing awaits it, no report card was read, no name given)."""


@dataclass(frozen=True)
class GroupThresholds:
    """Per-group operating thresholds the panel approved for one audited attribute (e.g. ``sex``): a patient
    of a listed group is flagged at its group's threshold, anyone else at the single threshold."""

    attribute: str
    thresholds: dict[str, float]
    carried_from: str | None = None
    """The model version whose approved thresholds these are, carried through its recalibration (the same
    patients of each group flagged); ``None``: approved from this model's own fairness report."""

    def as_dict(self) -> dict:
        out: dict = {"attribute": self.attribute, "thresholds": dict(self.thresholds)}
        return out | ({"carried_from": self.carried_from} if self.carried_from else {})

    @classmethod
    def from_dict(cls, d: dict) -> "GroupThresholds":
        carried = d.get("carried_from")
        return cls(
            str(d["attribute"]),
            {str(k): float(v) for k, v in d["thresholds"].items()},
            str(carried) if carried else None,
        )

    def words(self) -> str:
        listed = ", ".join(f"{g} {t:.3f}" for g, t in sorted(self.thresholds.items()))
        carried = (
            f", those approved with model {self.carried_from} carried through its recalibration"
            if self.carried_from
            else ""
        )
        return f"per-group thresholds by {attribute_title(self.attribute)} ({listed}{carried})"


@dataclass(frozen=True)
class SignOff:
    """One panel decision on one model version."""

    by: str
    approved: bool
    note: str
    report_card_sha256: str
    at: str
    group_thresholds: GroupThresholds | None = None

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "group_thresholds"}
        if self.group_thresholds:
            out["group_thresholds"] = self.group_thresholds.as_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SignOff":
        groups = d.get("group_thresholds")
        return cls(
            str(d["by"]),
            bool(d["approved"]),
            str(d["note"]),
            str(d["report_card_sha256"]),
            str(d["at"]),
            GroupThresholds.from_dict(groups) if groups else None,
        )

    def sentence(self) -> str:
        what = "approved" if self.approved else "rejected"
        groups = f" with {self.group_thresholds.words()}" if self.group_thresholds else ""
        note = f": {self.note}" if self.note else ""
        return (
            f"{what}{groups} by {self.by} on {self.at[:10]}{note} "
            f"(report card read: sha256 {self.report_card_sha256[:12]})"
        )


def recommended_group_thresholds(fairness: dict, attribute: str) -> GroupThresholds:
    """The fairness report's per-group thresholds for ``attribute`` (groups large enough to have one), as
    the panel approves them.

    Raises
    ------
    SignOffError
        The attribute was not audited, or none of its groups is large enough to have a threshold.
    """
    rows = [t for t in fairness.get("group_thresholds", []) if t["attribute"] == attribute]
    if not rows:
        audited = sorted({t["attribute"] for t in fairness.get("group_thresholds", [])})
        raise SignOffError(
            f"no per-group thresholds for '{attribute}' in the fairness report (audited: {', '.join(audited)})"
        )
    usable = {t["group"]: float(t["threshold"]) for t in rows if not t["suppressed"]}
    if not usable:
        raise SignOffError(f"every group of '{attribute}' is too small to have its own threshold")
    return GroupThresholds(attribute, usable)


def carried_group_thresholds(store: UseCaseStore, version: str) -> GroupThresholds | None:
    """The per-group thresholds of the model that ``version`` recalibrates, moved through the recalibration
    (:attr:`RecalibrationOffer.group_thresholds`), when ``version`` is the recalibration offered and that model
    had thresholds approved; else ``None``."""
    offer = store.recalibration.read() if store.recalibration.exists() else None
    if offer is None or offer.challenger_version != version or not offer.group_thresholds:
        return None
    carried = offer.group_thresholds
    return GroupThresholds(
        str(carried["attribute"]),
        {str(g): float(t) for g, t in carried["after"].items()},
        carried_from=offer.champion_version,
    )


def approved_group_thresholds(registry: Registry, version: str) -> GroupThresholds | None:
    """The per-group thresholds the panel approved with ``version``, if it did."""
    for d in reversed(registry.decisions()):
        if d.challenger == version and d.sign_off:
            signed = SignOff.from_dict(d.sign_off)
            return signed.group_thresholds if signed.approved else None
    return None


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
    group_thresholds_for: str | None = None,
    now: datetime | None = None,
) -> PromotionDecision:
    """Record the panel's decision on ``version`` (default: the newest awaiting sign-off) and, when it
    approves, make it champion. The report card of that version must exist (the panel signs what it read):
    its sha256 is recorded and the file is kept beside the model version. ``group_thresholds_for`` (an
    audited attribute, with an approval) approves the fairness report's per-group thresholds of that
    attribute with the model: scoring then flags each of its groups at the group's own threshold.

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
    # a recalibrated champion keeps the per-group thresholds approved with the model it recalibrates, moved
    # with the risks (its report card, the one signed, says so)
    carried = carried_group_thresholds(store, version) if approve else None
    groups = carried
    if group_thresholds_for:
        if not approve:
            raise SignOffError("per-group thresholds are approved with the model, not with a rejection")
        fairness = store.fairness.read() if store.fairness.exists() else None
        if fairness is not None and fairness.model_version == version:
            groups = recommended_group_thresholds(fairness.as_dict(), group_thresholds_for)
        elif carried is None or carried.attribute != group_thresholds_for:
            raise SignOffError(
                f"the fairness report of model {version} has not been written: materialize it first"
                + (
                    " (a recalibrated model has none: it keeps the thresholds of the model it recalibrates)"
                    if carried is not None
                    else ""
                )
            )
    content = card.read_bytes()
    atomic_write_bytes(registry.version_dir(version) / SIGNED_REPORT_CARD, content)
    record = SignOff(
        by=by,
        approved=approve,
        note=note,
        report_card_sha256=hashlib.sha256(content).hexdigest(),
        at=(now or datetime.now(UTC)).isoformat(),
        group_thresholds=groups,
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
