"""The landing contract as a document, generated from the objects ingestion validates with.

``docs/landing-contract.md`` holds the text of :func:`contract_markdown` between two markers; a test fails when
they differ, so the document cannot drift from the schemas, vocabularies and rules the code applies.
"""

from collections.abc import Iterable

import polars as pl

from clinical_ml.core import (
    clinical_sources,
    dicom,
    imaging,
    ingestion,
    landing,
    safety,
    site_mapping,
    units,
)
from clinical_ml.core.locations import PROJECT_ROOT

_TYPES = {
    pl.String: "text",
    pl.Float64: "number",
    pl.Int64: "integer",
    pl.Boolean: "boolean (1/0, true/false)",
    pl.Date: "date `YYYY-MM-DD`",
}
_PURPOSE = {
    "patients": "EHR demographics, one row per patient (MRN). Direct identifiers never leave the phi zone.",
    "encounters": "EHR/ADT hospital stays, one row per encounter.",
    "labs": "Laboratory results (lab system), one row per result.",
    "vitals": "ICU monitoring (PDMS) in long format, one row per charted value.",
    "labels": "Hospital-supplied labels (e.g. chart review), one row per encounter and label.",
} | clinical_sources.PURPOSE


def _type(dtype: object) -> str:
    dtype = getattr(dtype, "type", dtype)  # pandera wraps the polars dtype
    if isinstance(dtype, pl.Datetime):
        return "timestamp `YYYY-MM-DD HH:MM:SS` (naive, the site's clock)"
    types: dict = _TYPES
    return types.get(type(dtype), types.get(dtype, str(dtype)))


def _rule(checks: Iterable) -> str:
    parts = []
    for check in checks:
        stats = check.statistics or {}
        if "allowed_values" in stats:
            values = sorted(map(str, stats["allowed_values"]))
            shown = ", ".join(f"`{v}`" for v in values[:12])
            parts.append(f"one of {shown}" + (f" and {len(values) - 12} more" if len(values) > 12 else ""))
        elif "pattern" in stats:
            parts.append(f"matches `{stats['pattern']}`")
        elif "min_value" in stats:
            parts.append(f"at least {stats['min_value']:g}")
    return "; ".join(parts)


def _table(source: str) -> list[str]:
    schema = ingestion.SCHEMAS[source]
    lines = [
        f"### `{source}`" + (" (optional)" if source in landing.OPTIONAL_SOURCES else ""),
        "",
        _PURPOSE.get(source, ""),
        "",
        "| column | type | required | rule |",
        "|---|---|---|---|",
    ]
    for name, col in schema.columns.items():
        required = "may be empty" if col.nullable else "yes"
        if name in ingestion.OPTIONAL_COLUMNS.get(source, ()):
            required = "no: the column may be left out; " + required
        coded = name in site_mapping.CODED_FIELDS.get(source, ())
        notes = [
            "coded: recoded by the site mapping (see *Coded values*); a value it does not name becomes "
            "`unmapped`, never passed on as text"
            if coded
            else _rule(col.checks)
        ]
        if name in ingestion.ID_COLUMNS:
            notes.append(
                "an identifier: checked for spreadsheet mangling (scientific notation, lost zeros); the site "
                "mapping may declare the site's own pattern"
            )
        if name in ingestion.FREE_TEXT:
            notes.append(
                "formulas and markup counted, never a reason to reject"
                if coded
                else "text: formulas and markup counted, never a reason to reject"
            )
        lines.append(f"| `{name}` | {_type(col.dtype)} | {required} | {'; '.join(n for n in notes if n)} |")
    keys = ingestion.DUPLICATE_KEYS.get(source)
    if keys:
        lines += [
            "",
            f"Rows sharing ({', '.join(f'`{k}`' for k in keys)}) are duplicates: identical ones are "
            "kept once, differing ones rejected as `conflicting_duplicate`.",
        ]
    if source in ingestion.REVISION_COLUMN:
        lines.append(
            f"A later `{ingestion.REVISION_COLUMN[source]}` of the same key supersedes the earlier rows "
            "(`superseded`)."
        )
    lines += clinical_sources.contract_notes(source)
    if source in ingestion.EVENT_TIME:
        lines.append(
            f"`{ingestion.EVENT_TIME[source]}` must fall within its encounter (after birth and admission, at most "
            f"{ingestion.EVENT_GRACE.total_seconds() / 3600:g} h after discharge or death)."
        )
    return [*lines, ""]


def _codes() -> list[str]:
    lines = [
        "## Codes and units",
        "",
        "`labs.loinc_code` and `vitals.code` take the codes below, each with its canonical unit. Values in a "
        "listed variant unit are converted (the delivered value and unit are kept); any other unit is rejected "
        "as `unknown_unit`. Values outside the plausible range are kept, flagged and never used as features. "
        "The list is the shipped vocabulary (`clinical_ml/core/vocabulary.yaml`); a hospital adds codes, units "
        "and conversions with its own YAML files named in `CLINICAL_ML_VOCABULARY` (see docs/usecases.md).",
        "",
        "| source | code | name | canonical unit | also accepted | plausible range |",
        "|---|---|---|---|---|---|",
    ]
    variants: dict[str, list[str]] = {}
    for code, unit in units.UNIT_CONVERSIONS:
        variants.setdefault(code, []).append(f"`{unit}`")
    for source, table in (("labs", units.LAB_CODES), ("vitals", units.VITAL_CODES)):
        for code, (name, unit) in table.items():
            lo, hi = units.PLAUSIBLE_RANGES.get(code, (None, None))
            rng = f"{lo:g} to {hi:g}" if lo is not None and hi is not None else ""
            lines.append(
                f"| {source} | `{code}` | {name} | `{unit}` | {', '.join(variants.get(code, []))} | {rng} |"
            )
    lines += [
        "",
        "`medications.atc_code` takes the ATC codes below, each with the canonical unit of a dose; a dose in a "
        "listed variant unit is converted at the boundary, any other unit rejects the row (`unknown_unit`). A "
        "dose outside the plausible range is kept and flagged. `medications.route` takes "
        f"{', '.join(f'`{r}` ({n})' for r, n in units.ROUTES.items())}.",
        "",
        "| code | name | canonical unit | also accepted | plausible dose |",
        "|---|---|---|---|---|",
    ]
    med_variants: dict[str, list[str]] = {}
    for code, unit in units.MEDICATION_CONVERSIONS:
        med_variants.setdefault(code, []).append(f"`{unit}`")
    for code, (name, unit) in units.MEDICATION_CODES.items():
        lo, hi = units.MEDICATION_PLAUSIBLE[code]
        lines.append(
            f"| `{code}` | {name} | `{unit}` | {', '.join(med_variants.get(code, []))} | {lo:g} to {hi:g} |"
        )
    lines += [
        "",
        f"`diagnoses.icd10_code` is checked by pattern (`{clinical_sources.ICD10CM_DELIVERED}`), not against a "
        "list. `procedures.procedure_code` takes the ICD-10-PCS codes below.",
        "",
        "| code | name |",
        "|---|---|",
        *(f"| `{code}` | {name} |" for code, name in units.PROCEDURE_CODES.items()),
    ]
    return [*lines, ""]


def _imaging() -> list[str]:
    actions = {"X": "removed", "Z": "emptied", "D": "replaced by a dummy"}
    by_action: dict[str, list[str]] = {}
    for keyword, action in dicom.BASIC_PROFILE.items():
        by_action.setdefault(action, []).append(f"`{keyword}`")
    folder = f"{landing.IMAGING_FOLDER}/"
    lines = [
        "## Imaging (DICOM)",
        "",
        f"A batch may carry PACS imaging: DICOM files (`*{landing.DICOM_SUFFIX}`; headers alone are enough) in "
        f"its `{folder}` folder, one level deep, listed in the `{landing.COMPLETION_MARKER}` marker by their "
        f'path (`"{folder}<name>{landing.DICOM_SUFFIX}": {{"bytes": <size>, "sha256": "<hex>"}}`); without a '
        f"marker, every `*{landing.DICOM_SUFFIX}` file there is read. A file there that the marker does not list "
        "is not read (counted among the entries not read). Ingestion (`raw_imaging`) checks each file on its "
        f"own: a rejected file is copied into `quarantine/<batch>/{folder}` beside a JSON reason (a repeat of a "
        "file accepted in an earlier batch is not copied: the archive holds it), an accepted one is archived "
        "by its sha256, and the batch's other files and sources proceed whatever happens to one file. The "
        "ledger has one entry for the folder (source `imaging`) whose rows are its files: files in = accepted "
        "+ rejected. Reasons, first matching wins:",
        "",
        *(f"- `{code}`: {why}" for code, why in imaging.FILE_REASONS.items()),
        "",
        "A DICOM file cut short at an element boundary reads as a valid, shorter file: the marker's size and "
        "sha256 are what catch it. `PatientID` (the MRN) ties a file to its patient, who must be delivered in "
        "the same batch; `AdmissionID` (the encounter number) ties it to its stay, else the patient's stay that "
        "holds `StudyDate`/`StudyTime` (a date without a time: a stay that overlaps that day, and the study "
        "counts as known from the end of that day).",
        "",
        "At the anonymization boundary each accepted file is de-identified following the DICOM PS3.15 Basic "
        "Application Level Confidentiality Profile with the modified-dates option (`clinical_ml/core/dicom.py`):",
        "",
    ]
    for action in ("X", "Z", "D"):
        lines.append(f"- {actions[action]}: {', '.join(sorted(by_action.get(action, [])))}")
    lines += [
        "- `PatientID` and `PatientName` become the patient's pseudonym; every UID that is not a registered DICOM "
        f"UID becomes `{dicom.UID_ROOT}<integer>` derived under a secret (the same in every file and batch); "
        "dates and date-times move by the patient's date shift (the shift of the patient's other events); "
        "private attributes are removed, then every attribute not among the "
        f"{len(dicom.KEPT)} kept ones (coded and technical attributes, coded findings).",
        "- `BurnedInAnnotation` `YES`, `RecognizableVisualFeatures` `YES`, or no flag on "
        f"{', '.join(f'`{m}`' for m in sorted(dicom.BURN_IN_MODALITIES))}: the pixel data are withheld and "
        "counted with the reason; the de-identified header is released.",
        "- The files of the patients released (after the opt-out register and suppression, like every event) "
        "are written to `deid/imaging/<batch>/<subject_id>/<new SOP instance UID>.dcm`, once the batch passes "
        "the privacy gate, which also looks through them for identifiers; a later objection removes them.",
        f"- Events: `{dicom.IMAGING_CODE_PREFIX}<modality>//<body part>` per study (modality "
        f"{', '.join(f'`{m}`' for m in units.IMAGING_MODALITIES)}; body part "
        f"{', '.join(f'`{b}`' for b in units.IMAGING_BODY_PARTS)}; anything else `unmapped`) and "
        f"`{dicom.FINDING_CODE_PREFIX}<scheme>:<code>` per coded finding of a structured report "
        f"({', '.join(f'`{c}` ({n})' for c, n in units.IMAGING_FINDINGS.items())}; other codes are counted, "
        "not released).",
        "",
    ]
    return lines


def _coded_values() -> list[str]:
    default = site_mapping.load_site_mapping(folder=PROJECT_ROOT / "site_mappings")
    return [
        "## Coded values and the site mapping",
        "",
        "Each site maps its export onto this contract in a mapping file (`site_mappings/<name>.yaml`; the folder "
        f"is `${site_mapping.SITE_MAPPINGS_ENV}` or the data zones resource's `site_mappings_dir`). A batch names "
        f'its mapping in its `{landing.COMPLETION_MARKER}` marker (`"site_mapping": "<name>"`), else '
        f"`{site_mapping.DEFAULT_MAPPING}` applies. The mapping renames delivered columns per source, maps local "
        "lab and vital codes onto the codes below, local values of the coded columns onto the values of this "
        "table, declares the site's units (each with a code and a unit type) and sites, and may declare the "
        "site's identifier patterns. Values are compared without regard to case, surrounding blanks or runs of "
        "spaces; a contract value always maps to itself.",
        "",
        "A mapping may also declare the site's spellings of measurement units (`measurement_units`, per source: "
        "local spelling -> a unit listed under *Codes and units*) and its clock skew per time rule "
        f"(`clock_skew_minutes`: {', '.join(f'`{r}`' for r in site_mapping.SKEW_RULES)}; 0 to "
        f"{site_mapping.MAX_CLOCK_SKEW_MINUTES} minutes, default 0). A row whose availability time precedes its "
        "event time by no more than the skew is accepted with the event time as its availability time (a value "
        "is not seen before it is measured) and counted (`<rule>_tolerated` among the warnings); an earlier one "
        "is rejected with the rule's reason.",
        "",
        site_mapping.mapping_markdown(),
        "",
        f"The shipped `{site_mapping.DEFAULT_MAPPING}` mapping (`site_mappings/default.yaml`, the synthetic demo "
        f"hospital's) declares the units {', '.join(f'`{u}` ({t})' for u, t in default.unit_types().items())} "
        f"and the sites {', '.join(f'`{c}`' for c in sorted(default.allowed('site')))}.",
        "",
        "`unit` and `site` take the codes the site's mapping declares; `unit_type` is derived from the unit. A "
        f"value no mapping names becomes `{site_mapping.UNMAPPED}`: the row is kept, the value is counted per "
        "column on the ingestion page (`unmapped:<column>` among the warnings; a warning check fires above a "
        "set share), and the delivered text is listed only in the phi zone (`phi/unmapped/<source>/<batch>"
        ".parquet`) for the data steward: it never crosses the anonymization boundary. A delivered column the "
        "contract does not know is kept in the phi zone under its position (`extra_<n>`), never its header.",
        "",
    ]


def contract_markdown() -> str:
    """The generated part of ``docs/landing-contract.md``."""
    limits = safety.Limits()
    required = [s for s in landing.SOURCES if s not in landing.OPTIONAL_SOURCES]
    lines = [
        "## A batch",
        "",
        f"One folder per delivery under `landing/`, named by the batch (e.g. its date). One file per source, "
        f"named `<source>` + one of {', '.join(f'`{s}`' for s in landing.DATA_SUFFIXES)} (CSV with a header row, "
        f"UTF-8, or Parquet; a zip holds one such file). Required sources: "
        f"{', '.join(f'`{s}`' for s in required)}; optional: "
        f"{', '.join(f'`{s}`' for s in landing.OPTIONAL_SOURCES)}; and DICOM files in an "
        f"`{landing.IMAGING_FOLDER}/` folder (see *Imaging*).",
        "",
        f"Completion: a `{landing.COMPLETION_MARKER}` file written last, JSON "
        '`{"files": {"<name>": {"bytes": <size>, "sha256": "<hex>"}}}` listing every file (imaging files by '
        f"their path, `{landing.IMAGING_FOLDER}/<name>`); without it a batch "
        "is read once its files' names, sizes and times stayed the same across two checks and a quiet period. "
        "The same delivery copied again is recognised by its content hash and not ingested twice.",
        "",
        f"Limits: files up to {limits.max_file_bytes / 2**30:g} GiB; a zip member up to "
        f"{limits.max_uncompressed_bytes / 2**30:g} GiB decompressed and at most {limits.max_zip_ratio:g} times "
        "its compressed size.",
        "",
        "Cross-file checks look inside the batch: a lab, vital or encounter must name a patient or encounter "
        "delivered in the same batch (a batch is self-contained); only `labels` may name an encounter of an "
        "earlier batch.",
        "",
        "Time rules: timestamps are naive and in the site's clock; a timestamp more than one day after the "
        "time of ingestion is rejected (`future_date:<column>`), so exports whose dates were shifted into the "
        "future (as public research databases are) come in through an adapter, not the landing zone. Missing "
        f"values may be empty or one of {', '.join(f'`{s}`' for s in units.MISSING_TEXT_SENTINELS)}; numeric "
        f"sentinels {', '.join(f'`{v:g}`' for v in units.MISSING_NUMERIC_SENTINELS)} in a value column reject "
        "the row.",
        "",
        "## Sources",
        "",
    ]
    for source in landing.SOURCES:
        lines += _table(source)
    lines += _coded_values()
    lines += _codes()
    lines += _imaging()
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(contract_markdown(), end="")
