"""The clinical_ml code location with every step in its own Kubernetes Job (dagster-k8s).

NOT TESTED HERE (no cluster; dagster-k8s is not installed in this environment). Point the user-code deployment
at this module instead of `clinical_ml.definitions`; nothing else in the code changes. The run launcher,
storage and pools come from the instance (deploy/k8s/dagster.yaml).
"""

import dagster as dg
from dagster_k8s import k8s_job_executor

from clinical_ml.defs.build import build_definitions

defs = dg.Definitions.merge(
    build_definitions(),
    dg.Definitions(
        executor=k8s_job_executor.configured(
            {
                "max_concurrent": 8,
                "env_secrets": ["clinical-ml-postgres", "clinical-ml-secrets"],
                "env_vars": ["CLINICAL_ML_DATA_ROOT=/data", "CLINICAL_ML_USECASES=/app/usecases"],
                "volumes": [{"name": "zones", "persistentVolumeClaim": {"claimName": "clinical-ml-zones"}}],
                "volume_mounts": [{"name": "zones", "mountPath": "/data"}],
            }
        )
    ),
)
