"""One branch of the graph per use case, from cohort to reports (a factory over ``usecases/*.yaml``)."""

import dagster as dg

from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import in_use_case_groups
from clinical_ml.defs.usecase.evaluation import build_evaluation_assets
from clinical_ml.defs.usecase.fairness import build_fairness_assets
from clinical_ml.defs.usecase.features import build_features_assets
from clinical_ml.defs.usecase.feedback import build_feedback_assets
from clinical_ml.defs.usecase.monitoring import build_ehr_delivery_asset, build_monitoring_assets
from clinical_ml.defs.usecase.panel_actions import build_panel_action_assets
from clinical_ml.defs.usecase.report_card import build_report_card_assets
from clinical_ml.defs.usecase.training import build_training_assets


def build_use_case_assets(
    uc: UseCase, *, monitoring: MonitoringConfig, ehr_site_system: str | None = None
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """Assets and checks of one use case, keyed under its name, monitored at the ``monitoring`` levels; with
    ``ehr_site_system``, also the delivery of its RiskAssessments under the site's ids (that identifier
    system) to the phi zone's outbox."""
    delivery = [build_ehr_delivery_asset(uc, ehr_site_system)] if ehr_site_system else []
    built = [
        *build_features_assets(uc),
        *build_training_assets(uc),
        *build_evaluation_assets(uc),
        *build_fairness_assets(uc),
        *build_panel_action_assets(uc, monitoring),
        *build_report_card_assets(uc),
        *build_monitoring_assets(uc, monitoring),
        *build_feedback_assets(uc),
        *delivery,
    ]
    # one group per use case in the UI, each asset's stage kept as its tag
    assets = in_use_case_groups([a for a in built if isinstance(a, dg.AssetsDefinition)], uc.name)
    return [*assets, *(a for a in built if not isinstance(a, dg.AssetsDefinition))]
