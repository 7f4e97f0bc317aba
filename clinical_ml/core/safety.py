"""Defensive checks on delivered files before any parser sees them.

Everything here raises :class:`FileRejected` with a reason code and a detail made of counts, byte offsets and
line numbers only: a delivered file is patient data and its bytes never reach a message.
"""

import csv
import hashlib
import io
import os
import re
import stat
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

# Names a delivered file or batch folder may have: letters, digits, dot, dash, underscore; no leading dot.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAFE_COLUMN_NAME = re.compile(r"^[A-Za-z0-9_ .()/-]{1,64}$")
PARQUET_MAGIC = b"PAR1"
# Text a spreadsheet reads as a formula (OWASP CSV injection: =, +, -, @, tab, carriage return, and their
# full-width forms, which some spreadsheets fold onto them).
FORMULA_START = r"^[=+\-@\t\r\uff1d\uff0b\uff0d\uff20]"
ZIP_MAGIC = b"PK\x03\x04"


class FileRejected(Exception):
    """A whole file cannot be used as its source; the detail never contains patient values."""

    def __init__(
        self, reason_code: str, detail: str, *, line: int | None = None, byte_offset: int | None = None
    ):
        where = (f" (line {line})" if line is not None else "") + (
            f" (byte offset {byte_offset})" if byte_offset is not None else ""
        )
        super().__init__(f"{reason_code}: {detail}{where}")
        self.reason_code = reason_code
        self.detail = detail
        self.line = line
        self.byte_offset = byte_offset


@dataclass(frozen=True)
class Limits:
    """Size limits for delivered files.

    Parameters
    ----------
    max_file_bytes
        Largest delivered file (compressed size for a zip) accepted.
    max_uncompressed_bytes
        Largest member of a zip delivery once decompressed.
    max_zip_ratio
        Largest decompressed/compressed ratio of a zip member (zip bombs compress by 1000x and more).
    """

    max_file_bytes: int = 4 << 30
    max_uncompressed_bytes: int = 8 << 30
    max_zip_ratio: float = 200.0


@dataclass(frozen=True)
class ScanResult:
    """What one streaming pass over a file learned, without keeping its bytes."""

    sha256: str
    n_bytes: int
    n_newlines: int
    n_separators: int
    ends_with_newline: bool


def safe_name(name: str) -> bool:
    """True when ``name`` is a plain file name: no path parts, no control or unusual characters."""
    return bool(SAFE_NAME.match(name)) and name not in (".", "..") and ".." not in name


def safe_column_label(name: str) -> str:
    """A column name fit for a message: itself when plain, else a placeholder (headers can hold anything)."""
    return name if SAFE_COLUMN_NAME.match(name) else "<unprintable column name>"


def neutralize_formula(text: pl.Expr) -> pl.Expr:
    """Text that a spreadsheet would run as a formula, prefixed with a single quote (the OWASP way), so it
    shows as text; everything else as it is. For exports a person may open in a spreadsheet: the data itself
    keeps the delivered text (a phone number ``+1 617 ...`` is data)."""
    return pl.when(text.str.contains(FORMULA_START)).then(pl.lit("'") + text).otherwise(text)


def check_entry(path: Path, *, root: Path) -> None:
    """Reject symlinks, non-regular files, odd names and anything resolving outside ``root``.

    Raises
    ------
    FileRejected
        ``odd_file_name``, ``symlink``, ``not_regular_file`` or ``path_escape``.
    """
    if not safe_name(path.name):
        raise FileRejected("odd_file_name", "file name has path parts or characters outside [A-Za-z0-9._-]")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileRejected("file_missing", "the file disappeared before it could be read") from None
    if stat.S_ISLNK(st.st_mode):
        raise FileRejected("symlink", "symbolic links are never followed in the landing zone")
    if not stat.S_ISREG(st.st_mode):
        raise FileRejected("not_regular_file", "only regular files are read")
    real_root = root.resolve()
    if real_root not in path.resolve().parents:
        raise FileRejected("path_escape", "the file resolves outside its batch folder")


def check_size(path: Path, *, limits: Limits) -> int:
    n = path.stat().st_size
    if n == 0:
        raise FileRejected("empty_file", "the file has 0 bytes")
    if n > limits.max_file_bytes:
        raise FileRejected("file_too_large", f"{n} bytes exceeds the limit of {limits.max_file_bytes} bytes")
    return n


def sniff_text(path: Path) -> None:
    """Reject encodings and binary content that a UTF-8 CSV reader would misread.

    A UTF-8 byte-order mark is accepted (the reader strips it); UTF-16/32 and NUL bytes are not.
    """
    with path.open("rb") as f:
        head = f.read(1 << 16)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FileRejected("utf16_encoding", "UTF-16/32 byte-order mark: re-export as UTF-8", byte_offset=0)
    if head.startswith((PARQUET_MAGIC, ZIP_MAGIC)):
        raise FileRejected("wrong_file_type", "binary content in a file named .csv", byte_offset=0)
    nul = head.find(b"\x00")
    if nul >= 0:
        # Every other byte NUL is UTF-16 without a byte-order mark.
        code = "utf16_encoding" if head[1::2].count(0) > len(head) // 4 else "binary_content"
        raise FileRejected(code, "NUL bytes in a text file", byte_offset=nul)
    first_line = head.split(b"\n", 1)[0]
    bare_cr = first_line.find(b"\r")
    if 0 <= bare_cr < len(first_line) - 1 or (bare_cr >= 0 and b"\n" not in head):
        # A carriage return that ends the header (old Mac exports end every line so): the CSV readers would
        # see one long line, or stop at the first record.
        raise FileRejected(
            "cr_line_endings",
            "lines end with a bare carriage return (CR): re-export with LF or CRLF line ends",
            line=1,
            byte_offset=bare_cr,
        )


def first_invalid_utf8(path: Path) -> int | None:
    """Byte offset of the first byte that is not valid UTF-8, or ``None``."""
    offset = 0
    carry = b""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
                    carry = data[exc.start :]
                    offset += exc.start
                    continue
                return offset + exc.start
            offset += len(data)
    return offset if carry else None


def scan_file(path: Path, *, separator: str = ",") -> ScanResult:
    """One streaming pass: sha256, size, newline and separator counts, last byte.

    The counts let a parsed CSV be checked for lines with the wrong number of fields without a Python loop
    over rows. Hashing and counting release the GIL, so the pass may run beside a polars read.
    """
    h = hashlib.sha256()
    nl = sep = n = 0
    last = b""
    sep_b = ord(separator)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            arr = np.frombuffer(chunk, dtype=np.uint8)
            nl += int(np.count_nonzero(arr == 10))
            sep += int(np.count_nonzero(arr == sep_b))
            n += len(chunk)
            last = chunk[-1:]
    return ScanResult(h.hexdigest(), n, nl, sep, last == b"\n")


class BackgroundScan:
    """:func:`scan_file` in a thread, so the pass overlaps with parsing."""

    def __init__(self, path: Path) -> None:
        self._result: ScanResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._result = scan_file(path)
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

    def result(self) -> ScanResult:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def field_count_problems(path: Path, *, n_columns: int, limit: int = 1_000_000) -> tuple[list[int], int]:
    """Data rows (1-based, as the CSV parser counts them) whose field count differs from the header's.

    The slow path, run only when the counts of :func:`scan_file` do not add up. Returns the bad row numbers
    (at most ``limit``) and the number of records read.
    """
    bad: list[int] = []
    with path.open("r", encoding="utf-8-sig", newline="", errors="replace") as f:
        reader = csv.reader(f, strict=False)
        n = 0
        try:
            next(reader, None)
            for n, rec in enumerate(reader, start=1):
                if len(rec) != n_columns and len(bad) < limit:
                    bad.append(n)
        except csv.Error:
            # a field over the reader's size limit (a runaway quote swallowing the rest of the file) or a
            # line break where none may be
            raise FileRejected(
                "malformed_csv",
                f"record {n + 1} cannot be split into fields (a runaway quote or a field over "
                f"{csv.field_size_limit()} characters)",
                line=reader.line_num,
            ) from None
    return bad, n


def first_malformed_line(path: Path, *, n_columns: int) -> int | None:
    """Physical line number of the first record that the standard CSV reader cannot split into the header's
    field count (unbalanced quotes, extra separators), or ``None``."""
    with path.open("r", encoding="utf-8-sig", newline="", errors="replace") as f:
        reader = csv.reader(f, strict=True)
        try:
            next(reader, None)
            start = reader.line_num + 1
            for rec in reader:
                if len(rec) != n_columns:
                    return start
                start = reader.line_num + 1
        except csv.Error:
            return start
    return None


def header_names(path: Path) -> list[str]:
    """Column names of a CSV's first record (read with the standard library; a BOM is dropped)."""
    with path.open("r", encoding="utf-8-sig", newline="", errors="replace") as f:
        head = f.read(1 << 16)
    try:
        first = next(csv.reader(io.StringIO(head, newline="")), [])
    except csv.Error:
        raise FileRejected(
            "malformed_header", "the header line cannot be split into column names", line=1
        ) from None
    # surrounding blanks and a byte-order mark left inside a quoted first name are not part of a name
    return [c.strip().lstrip("\ufeff").strip() for c in first]


def extract_zip_member(path: Path, *, workdir: Path, limits: Limits) -> Path:
    """The single data file of a zip delivery, extracted safely into ``workdir``.

    Rejects archives with more than one file, member names with path parts (zip slip), encrypted members,
    declared or actual sizes over the limits and compression ratios typical of zip bombs. Decompression is
    streamed and stopped at the limit, so a lying header cannot fill the disk.

    Raises
    ------
    FileRejected
        ``bad_zip``, ``zip_multiple_members``, ``zip_slip``, ``zip_encrypted``, ``zip_bomb``.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise FileRejected("bad_zip", "not a readable zip archive") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) != 1:
            raise FileRejected(
                "zip_multiple_members", f"{len(members)} files in the archive; exactly 1 expected"
            )
        m = members[0]
        name = m.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise FileRejected("zip_slip", "archive member name escapes the extraction folder")
        if not safe_name(name) or not name.endswith((".csv", ".parquet")):
            raise FileRejected("odd_file_name", "archive member is not a plainly named .csv or .parquet file")
        if m.flag_bits & 0x1:
            raise FileRejected("zip_encrypted", "encrypted archive members are not read")
        compressed = max(m.compress_size, 1)
        if m.file_size > limits.max_uncompressed_bytes or m.file_size / compressed > limits.max_zip_ratio:
            raise FileRejected(
                "zip_bomb",
                f"declared {m.file_size} bytes from {m.compress_size} compressed exceeds the limits",
            )
        workdir.mkdir(parents=True, exist_ok=True)
        dest = workdir / name
        budget = min(limits.max_uncompressed_bytes, int(limits.max_zip_ratio * compressed))
        written = 0
        try:
            with zf.open(m) as src, dest.open("wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    written += len(chunk)
                    if written > budget:
                        raise FileRejected(
                            "zip_bomb",
                            f"decompressed size passed {budget} bytes; stopped",
                            byte_offset=budget,
                        )
                    out.write(chunk)
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError):
            dest.unlink(missing_ok=True)
            raise FileRejected("bad_zip", "archive member could not be decompressed") from None
        except FileRejected:
            dest.unlink(missing_ok=True)
            raise
    return dest
