import json

import dagster as dg

from clinical_ml.core.landing import find_complete_batches
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME, batch_partitions
from clinical_ml.defs.ingestion.jobs import batch_ingestion_job
from clinical_ml.resources.zones import DataZones


@dg.sensor(
    job=batch_ingestion_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts one ingestion run per complete new batch in the landing zone. The run key is the "
    "batch's content hash, so a re-delivered identical batch never runs twice and changed content runs again.",
)
def landing_sensor(context: dg.SensorEvaluationContext, zones: DataZones) -> dg.SensorResult:
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    batches = find_complete_batches(zones.landing)
    new = [b for b in batches if seen.get(b.batch_id) != b.content_hash]
    known = set(context.instance.get_dynamic_partitions(BATCH_PARTITIONS_NAME))
    to_add = [b.batch_id for b in new if b.batch_id not in known]
    for b in new:
        seen[b.batch_id] = b.content_hash
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"{b.batch_id}:{b.content_hash}",
                partition_key=b.batch_id,
                tags={"batch_id": b.batch_id, "content_sha256": b.content_hash},
            )
            for b in new
        ],
        dynamic_partitions_requests=[batch_partitions.build_add_request(to_add)] if to_add else [],
        cursor=json.dumps(seen, sort_keys=True),
    )
