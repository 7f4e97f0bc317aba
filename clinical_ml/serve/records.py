"""What the service served and what clinicians answered, kept in the phi zone.

Layout under ``<data root>/phi/serving/<use case>/``::

    predictions/<YYYY-MM-DD>.jsonl   one line per card served (UTC day): the EHR's patient and encounter ids,
                                     the hook call, the card's uuid, model version, risk, band, guardrail code,
                                     the features' top reasons (feature names and values), observations not used
    feedback/<YYYY-MM-DD>.jsonl      one line per feedback entry: the card's uuid, accepted or overridden, the
                                     coded override reason, the clinician's free-text comment (phi only)
    requests/<YYYY-MM-DD>.jsonl      one line per hook or feedback call: route, HTTP status, milliseconds
                                     taken, outcome code, model version (no identifier, no value)

Both hold identifiers and free text: they never leave the phi zone as they are. Each line (or the lines of a batch
of hook calls answered together) is written with one ``write`` on a file opened for appending, so concurrent
requests never interleave within a line.
"""

import json
import os
import threading
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path

PREDICTIONS = "predictions"
FEEDBACK = "feedback"
REQUESTS = "requests"


class ServingRecords:
    """The phi-zone record of served predictions and clinician feedback, and the cards recently served."""

    def __init__(self, phi_root: Path, *, remember_cards: int = 100_000) -> None:
        self.root = Path(phi_root) / "serving"
        self._lock = threading.Lock()
        self._cards: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self._remember = remember_cards

    def folder(self, use_case: str, kind: str) -> Path:
        return self.root / use_case / kind

    def path(self, use_case: str, kind: str, day: str) -> Path:
        return self.folder(use_case, kind) / f"{day}.jsonl"

    def _append(self, use_case: str, kind: str, record: dict, now: datetime) -> None:
        self._append_many(use_case, kind, [(record, now)])

    def _append_many(self, use_case: str, kind: str, records: list[tuple[dict, datetime]]) -> None:
        """Records as lines of their day's file, each day's lines with one ``write`` (one line or many: a
        write to a file opened for appending lands whole at its end)."""
        days: dict[str, list[bytes]] = {}
        for record, now in records:
            line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
            days.setdefault(now.strftime("%Y-%m-%d"), []).append(line)
        for day, lines in days.items():
            path = self.path(use_case, kind, day)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"".join(lines))
            finally:
                os.close(fd)

    def prediction(self, use_case: str, record: dict, *, now: datetime | None = None) -> None:
        self.predictions(use_case, [(record, now or datetime.now(UTC))])

    def predictions(self, use_case: str, records: list[tuple[dict, datetime]]) -> None:
        """Cards served (each record with its time): one write per day's file for all, as a batch of hook
        calls answers them together."""
        with self._lock:
            for record, _ in records:
                self._cards[record["card_uuid"]] = (use_case, record.get("model_version"))
            while len(self._cards) > self._remember:
                self._cards.popitem(last=False)
        self._append_many(
            use_case,
            PREDICTIONS,
            [({"served_at": now.isoformat(), **record}, now) for record, now in records],
        )

    def served_card(self, card_uuid: str, *, use_case: str | None = None) -> tuple[str, str | None] | None:
        """The use case and model version of a card served recently, else None: from this process's memory,
        else (given the ``use_case``) from its records of today and yesterday (UTC), where another worker
        process of the service wrote it."""
        with self._lock:
            found = self._cards.get(card_uuid)
        if found is not None or use_case is None:
            return found
        today = datetime.now(UTC)
        for day in (today, today - timedelta(days=1)):
            path = self.path(use_case, PREDICTIONS, day.strftime("%Y-%m-%d"))
            if not path.is_file():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if card_uuid not in line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("card_uuid") == card_uuid:
                    return use_case, record.get("model_version")
        return None

    def feedback(self, use_case: str, record: dict, *, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        self._append(use_case, FEEDBACK, {"received_at": now.isoformat(), **record}, now)

    def request(self, use_case: str, record: dict, *, now: datetime | None = None) -> None:
        """A call answered (for the system-health page: latency and error rate)."""
        now = now or datetime.now(UTC)
        self._append(use_case, REQUESTS, {"at": now.isoformat(), **record}, now)

    def read(self, use_case: str, kind: str) -> list[dict]:
        """Every record of a kind, oldest day first (for tests and the later pseudonymisation step)."""
        folder = self.folder(use_case, kind)
        if not folder.exists():
            return []
        out = []
        for p in sorted(folder.glob("*.jsonl")):
            out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return out
