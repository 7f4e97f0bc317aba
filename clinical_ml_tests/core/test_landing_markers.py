"""Deliveries that never start (issue 17 class 5): every way a completion marker or its listing can be wrong
gives a started batch or a reason the sensor reports, generated as variants of one clean batch."""

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from clinical_ml.core.delivery import ZonePaths, process_batch
from clinical_ml.core.landing import (
    COMPLETION_MARKER,
    LandingBatch,
    NotStarted,
    inspect_batch,
    line_ending_conversions,
    overdue_batches,
)
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker

NOW = datetime(2026, 3, 1)
BATCH = "2026-01-05"


def _marker(batch: Path) -> dict:
    return json.loads((batch / COMPLETION_MARKER).read_text())


def _write_marker(batch: Path, doc: object) -> None:
    (batch / COMPLETION_MARKER).write_text(json.dumps(doc))


def _raw_marker(data: bytes) -> Callable[[Path], None]:
    def damage(batch: Path) -> None:
        (batch / COMPLETION_MARKER).write_bytes(data)

    return damage


def _marker_folder(batch: Path) -> None:
    (batch / COMPLETION_MARKER).unlink()
    (batch / COMPLETION_MARKER).mkdir()


def _marker_symlink(batch: Path) -> None:
    real = batch.parent / "elsewhere.json"
    shutil.move(batch / COMPLETION_MARKER, real)
    (batch / COMPLETION_MARKER).symlink_to(real)


def _crlf(name: str) -> Callable[[Path], None]:
    def damage(batch: Path) -> None:  # the marker was written before a text-mode transfer
        p = batch / name
        p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))

    return damage


def _renamed(batch: Path) -> None:
    (batch / "labs.csv").rename(batch / "labs_2026.csv")


def _digests(fn: Callable[[str], str | None]) -> Callable[[Path], None]:
    def damage(batch: Path) -> None:
        doc = _marker(batch)
        for info in doc["files"].values():
            digest = fn(info["sha256"])
            if digest is None:
                del info["sha256"]
            else:
                info["sha256"] = digest
        _write_marker(batch, doc)

    return damage


def _listing(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(batch: Path) -> None:
        _write_marker(batch, fn(_marker(batch)))

    return damage


# name -> (damage, reason code of a folder not started, or "started")
VARIANTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (_raw_marker(b""), "marker_empty"),
    "blank_lines": (_raw_marker(b" \r\n\n"), "marker_empty"),
    "not_json": (_raw_marker(b"done\n"), "marker_invalid_json"),
    "cut_json": (_raw_marker(b'{"files": {"labs.csv": {"bytes": 1'), "marker_invalid_json"),
    "json_list": (_raw_marker(b"[]"), "marker_invalid_listing"),
    "json_null": (_raw_marker(b"null"), "marker_invalid_listing"),
    "files_list": (_listing(lambda d: {"files": list(d["files"])}), "marker_invalid_listing"),
    "size_text": (
        _listing(lambda d: {"files": {k: {**v, "bytes": "many"} for k, v in d["files"].items()}}),
        "marker_invalid_listing",
    ),
    "size_negative": (
        _listing(lambda d: {"files": {k: {**v, "bytes": -1} for k, v in d["files"].items()}}),
        "marker_invalid_listing",
    ),
    "digest_not_hex": (_digests(lambda h: "z" * 64), "marker_invalid_digest"),
    "digest_short": (_digests(lambda h: h[:40]), "marker_invalid_digest"),
    "folder": (_marker_folder, "marker_not_a_file"),
    "symlink": (_marker_symlink, "marker_symlink"),
    "crlf_in_transfer": (_crlf("vitals.csv"), "size_mismatch"),
    "listed_file_renamed": (_renamed, "listed_file_missing"),
    "digest_upper_case": (_digests(str.upper), "started"),
    "digest_mixed_case": (_digests(lambda h: h[:32].upper() + h[32:]), "started"),
    "no_digest": (_digests(lambda h: None), "started"),
    "empty_digest": (_digests(lambda h: ""), "started"),
    "size_as_text_digits": (
        _listing(lambda d: {"files": {k: {**v, "bytes": str(v["bytes"])} for k, v in d["files"].items()}}),
        "started",
    ),
}


@pytest.fixture(scope="module")
def clean_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    generate_hospital(out, SyntheticConfig(n_patients=40, n_batches=1, seed=5))
    return out / BATCH


def make_variant(clean: Path, landing: Path, name: str) -> Path:
    batch = landing / name
    shutil.copytree(clean, batch, symlinks=True)
    VARIANTS[name][0](batch)
    return batch


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_marker_variant_is_started_or_says_why(name: str, clean_batch: Path, tmp_path: Path):
    batch = make_variant(clean_batch, tmp_path, name)
    expected = VARIANTS[name][1]
    found = inspect_batch(batch)
    if expected == "started":
        assert isinstance(found, LandingBatch)
    else:
        assert isinstance(found, NotStarted) and found.reason == expected
        assert found.batch_id == name
        assert "labs" not in found.detail and "vitals" not in found.detail  # counts, never a file name


@pytest.mark.parametrize(
    ("name", "unchecked"),
    [("digest_upper_case", 0), ("digest_mixed_case", 0), ("no_digest", 1), ("empty_digest", 1)],
)
def test_a_started_variant_is_accepted_and_says_when_integrity_was_not_checked(
    name: str, unchecked: int, clean_batch: Path, tmp_path: Path
):
    zones = ZonePaths(
        landing=tmp_path / "l", archive=tmp_path / "a", quarantine=tmp_path / "q", phi=tmp_path / "p"
    )
    make_variant(clean_batch, zones.landing, name).rename(zones.landing / BATCH)
    outcomes = process_batch(zones=zones, batch_id=BATCH, now=NOW)
    assert {o.status for o in outcomes.values()} == {"accepted"}
    assert {o.warnings.get("integrity_not_checked", 0) for o in outcomes.values()} == {unchecked}
    batch = inspect_batch(zones.landing / BATCH)
    assert isinstance(batch, LandingBatch)
    assert batch.unverified_files == unchecked * len(batch.files)


def test_a_wrong_digest_in_upper_case_is_still_a_mismatch(clean_batch: Path, tmp_path: Path):
    zones = ZonePaths(
        landing=tmp_path / "l", archive=tmp_path / "a", quarantine=tmp_path / "q", phi=tmp_path / "p"
    )
    batch = zones.landing / BATCH
    shutil.copytree(clean_batch, batch)
    _digests(lambda h: ("0" * 64 if h == _marker(batch)["files"]["labs.csv"]["sha256"] else h).upper())(batch)
    outcomes = process_batch(zones=zones, batch_id=BATCH, now=NOW)
    assert (outcomes["labs"].status, outcomes["labs"].reason_code) == ("quarantined", "checksum_mismatch")


@pytest.mark.parametrize(("convert", "expected"), [(b"\r\n", 1), (b"\n\n", 0)])
def test_line_endings_converted_in_transfer_are_named(
    convert: bytes, expected: int, clean_batch: Path, tmp_path
):
    batch = tmp_path / BATCH
    shutil.copytree(clean_batch, batch)
    p = batch / "labs.csv"
    p.write_bytes(p.read_bytes().replace(b"\n", convert))
    assert line_ending_conversions(batch) == expected


def _why(batch_id: str, reason: str) -> NotStarted:
    return NotStarted(batch_id, reason, "")


@pytest.mark.parametrize(
    ("waiting", "observed", "now", "reported"),
    [
        ({}, {"a": "marker_empty"}, 100.0, []),  # first sight
        ({"a": [0.0, ""]}, {"a": "marker_empty"}, 59.0, []),  # within the limit
        ({"a": [0.0, ""]}, {"a": "marker_empty"}, 60.0, ["a"]),  # at the limit
        ({"a": [0.0, "marker_empty"]}, {"a": "marker_empty"}, 999.0, []),  # reported once
        ({"a": [0.0, "marker_empty"]}, {"a": "size_mismatch"}, 999.0, ["a"]),  # a new reason, reported again
        ({"a": [0.0, ""], "b": [50.0, ""]}, {"a": "x", "b": "x"}, 70.0, ["a"]),
    ],
)
def test_a_folder_not_started_is_reported_once_per_reason_after_the_limit(waiting, observed, now, reported):
    nxt, report = overdue_batches(
        waiting, {k: _why(k, r) for k, r in observed.items()}, now=now, limit_seconds=60
    )
    assert [w.batch_id for w in report] == reported
    assert set(nxt) == set(observed)  # a folder started or gone is forgotten
    for k in observed:
        assert nxt[k][0] == waiting.get(k, [now])[0]  # first seen is kept
    assert (
        overdue_batches(nxt, {k: _why(k, r) for k, r in observed.items()}, now=now, limit_seconds=60)[1] == []
    )


def test_a_marker_being_written_is_not_reported_before_the_limit(clean_batch: Path, tmp_path: Path):
    batch = make_variant(clean_batch, tmp_path, "empty")
    found = inspect_batch(batch)
    assert isinstance(found, NotStarted)
    waiting, report = overdue_batches({}, {batch.name: found}, now=1000.0, limit_seconds=3600)
    assert report == []
    write_completion_marker(batch)  # the writer finished
    assert isinstance(inspect_batch(batch), LandingBatch)
    assert overdue_batches(waiting, {}, now=9999.0, limit_seconds=3600) == ({}, [])
    assert os.path.isfile(batch / COMPLETION_MARKER)
