"""Clinician feedback from the point-of-care service (``clinical-ml serve``): pseudonymised into the
de-identified zone as a source of its own, then monitored (acceptance and override rates, rising overrides)."""

import dagster as dg

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.core.clinician_feedback import (
    FeedbackMonitoring,
    feedback_markdown,
    feedback_monitoring,
    no_feedback,
    pseudonymise_feedback,
    read_json_lines,
)
from clinical_ml.core.consent import read_register
from clinical_ml.core.reports import rounded
from clinical_ml.core.served_predictions import pseudonymise_predictions, service_requests
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.anonymization.assets import DEID_TABLES
from clinical_ml.defs.conventions import ML_OWNERS, PRIVACY_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import use_case_key
from clinical_ml.resources.pseudonym_secret import hmac_key_for
from clinical_ml.resources.settings import AnonymizationSettings
from clinical_ml.resources.zones import DataZones
from clinical_ml.serve.cards import OVERRIDE_REASONS
from clinical_ml.serve.records import FEEDBACK, PREDICTIONS, REQUESTS, ServingRecords

RISING_CHECK = "override_rate_not_rising"


def clinician_feedback_monitoring(uc: UseCase, store: UseCaseStore) -> FeedbackMonitoring:
    """The use case's released feedback (none before the first run) by unit, subgroup, band and period."""
    released = store.clinician_feedback
    return feedback_monitoring(
        released.read() if released.exists() else no_feedback(),
        store.cohort.read() if store.cohort.exists() else None,
        attributes=uc.subgroups.attributes,
        min_cell_size=uc.subgroups.min_cell_size,
        offered_reasons=list(OVERRIDE_REASONS),
    )


def build_feedback_assets(uc: UseCase) -> list[dg.AssetsDefinition]:
    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("clinician_feedback"),
        # after each batch's anonymization: the vault then knows the batch's patients
        deps=[DEID_TABLES["encounters"]],
        group_name=Stage.ANONYMIZATION,
        kinds={"polars", "parquet"},
        tags={**tags(DataClass.DEIDENTIFIED), "source": "clinician_feedback"},
        owners=PRIVACY_OWNERS,
        pool="pseudonym_vault",
        description="Clinicians' answers to the point-of-care cards (accepted or overridden, the coded override "
        "reason), pseudonymised from the service's phi-zone records as anonymization pseudonymises (vault "
        "or HMAC); no EHR id, card id, time stamp (only the year-quarter) or free-text comment crosses, and "
        "patients of the opt-out register are left out. With them, the cards served (pseudonymised the same "
        "way: model version, outcome, risk, band, guardrail code, quarter) and the calls answered (day, "
        "route, status, milliseconds, outcome code) for monitoring and the system-health page.",
    )
    def clinician_feedback(zones: DataZones, anonymization: AnonymizationSettings) -> dg.MaterializeResult:
        records, phi = ServingRecords(zones.phi), zones.phi_store()
        served = read_json_lines(records.folder(uc.name, PREDICTIONS))
        answers = read_json_lines(records.folder(uc.name, FEEDBACK))
        key_ = hmac_key_for(anonymization)
        vault = phi.read_vault() if key_ is None else Vault.empty()
        opted_out = read_register(phi.consent_register)
        release = pseudonymise_feedback(
            served.records,
            answers.records,
            offered_reasons=OVERRIDE_REASONS,
            vault=vault,
            hmac_key=key_,
            opted_out=opted_out,
        )
        store = zones.use_case(uc.name)
        # a use case never served has nothing to release: no table (and no folder in the deid zone) for it
        if served.records or answers.records or store.clinician_feedback.exists():
            store.clinician_feedback.write(release.frame)
        cards = pseudonymise_predictions(served.records, vault=vault, hmac_key=key_, opted_out=opted_out)
        calls = read_json_lines(records.folder(uc.name, REQUESTS))
        if served.records or store.served_predictions.exists():
            store.served_predictions.write(cards.frame)
        if calls.records or store.service_requests.exists():
            store.service_requests.write(service_requests(calls.records))
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": release.released,
                **release.as_dict(),
                **cards.as_dict(),
                "unreadable_lines": served.unreadable + answers.unreadable + calls.unreadable,
                "report": dg.MetadataValue.md(f"{release.sentence()} {cards.sentence()}"),
            }
        )

    @dg.asset(
        key=key("feedback_monitoring"),
        deps=[key("clinician_feedback"), key("cohort")],
        group_name=Stage.MONITORING,
        kinds={"polars"},
        tags=tags(DataClass.AGGREGATE),
        owners=ML_OWNERS,
        description="Acceptance and override rates (Wilson 95% CI) and override reasons of the point-of-care "
        "cards, overall and by unit, subgroup, risk band, year-quarter and model version; counts below the "
        "use case's min_cell_size masked.",
        check_specs=[
            dg.AssetCheckSpec(
                RISING_CHECK,
                asset=key("feedback_monitoring"),
                description="The newest year-quarter's override rate is not rising: its Wilson 95% interval "
                "does not lie wholly above the pooled rate of the earlier quarters (judged when both hold at "
                "least min_cell_size answers). A warning for the next retrospective.",
            )
        ],
    )
    def feedback_monitoring_asset(zones: DataZones):
        found = clinician_feedback_monitoring(uc, zones.use_case(uc.name))
        yield dg.MaterializeResult(
            metadata={
                **{k: rounded(v) if isinstance(v, float) else v for k, v in found.metadata().items()},
                "report": dg.MetadataValue.md(feedback_markdown(found)),
            }
        )
        yield dg.AssetCheckResult(
            check_name=RISING_CHECK,
            passed=not found.rising.rising,
            severity=dg.AssetCheckSeverity.WARN,
            description=found.rising.sentence(),
            metadata={"judged": found.rising.judged, "period": found.rising.period or "none"},
        )

    return [clinician_feedback, feedback_monitoring_asset]
