"""Preference pairs from the layouts people have, deduplicated, with bad rows counted and skipped.

Layouts (detected per file by extension, then per record by its keys):
  * JSONL (one object per line), JSON (a list of objects, or {"data": [...]}), CSV (header row) with
    either `{prompt, chosen, rejected}` (generic) or `{prompt, path1, path2, confidence}` (HPSv3 /
    HPDv3: path1 is the winner). An optional numeric `confidence` is kept (default 1.0).
  * Pick-a-Pic parquet: one `.parquet` file or a folder of shards with `caption`, `jpg_0`, `jpg_1`
    (image bytes, or {"bytes": ...} structs) and `label_0` in {0, 0.5, 1}; label_0 = 1 means image
    0 wins; ties (0.5) are skipped.
Image paths resolve relative to the data file. Identical images (same resolved path, or identical
bytes) and identical prompts are kept once, so each is encoded once. A missing or unreadable image,
a tie or a malformed row is logged with its file and row, counted in `PreferenceData.skipped`, and
the pair is dropped; only unreadable *data files* raise `DRMError`.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from drm_core import DRMError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".jsonl", ".json", ".csv")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
MAX_WARNINGS_PER_REASON = 20  # after this many warnings of one kind, only the final count is logged


@dataclass(frozen=True)
class ParquetImage:
    """An image stored as bytes in one cell of a parquet file (read lazily by `read_image_bytes`)."""

    path: Path
    row: int
    column: str


ImageRef = Union[Path, ParquetImage]


@dataclass
class PreferenceData:
    """Unique prompts and images plus pairs (prompt idx, winner idx, loser idx, confidence)."""

    prompts: list[str] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    pairs: list[tuple[int, int, int, float]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    sources: list[str] = field(default_factory=list)


class _BadRow(Exception):
    """A row to skip: `reason` is the skip-count key, the message says what was wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Record:
    prompt: Any
    winner: Any  # a path string (tables) or raw bytes (parquet)
    loser: Any
    confidence: float
    where: str  # "<file> line N" / "<file> row N", for messages
    columns: tuple[str, str]  # names of the winner and loser fields, for messages
    row: int = -1  # parquet row (locates the image bytes again when encoding)


class _Builder:
    """Accumulates deduplicated prompts, images and pairs while data files are read."""

    def __init__(self, check_images: bool):
        self.data = PreferenceData()
        self.check_images = check_images
        self._prompt_ids: dict[str, int] = {}
        self._image_ids: dict[Any, int] = {}
        self._image_ok: dict[Any, str | None] = {}  # dedup key -> None if readable, else skip reason
        self._warned: Counter = Counter()

    def skip(self, reason: str, message: str) -> None:
        self.data.skipped[reason] += 1
        self._warned[reason] += 1
        if self._warned[reason] <= MAX_WARNINGS_PER_REASON:
            log.warning("skipping %s", message)
        elif self._warned[reason] == MAX_WARNINGS_PER_REASON + 1:
            log.warning("more rows skipped for %s; only counting from now on", reason)

    def add(self, record: _Record, base: Path, from_table: bool) -> None:
        """Validate one record and add its pair; raises _BadRow to skip it."""
        if not isinstance(record.prompt, str):
            raise _BadRow("malformed_row", f"{record.where}: prompt must be a string, got {record.prompt!r:.60}")
        refs = [self._image(value, base, from_table, record, column)
                for value, column in zip((record.winner, record.loser), record.columns)]
        if refs[0][0] == refs[1][0]:
            raise _BadRow("same_image", f"{record.where}: winner and loser are the same image")
        prompt = self._prompt_ids.setdefault(record.prompt, len(self._prompt_ids))
        if prompt == len(self.data.prompts):
            self.data.prompts.append(record.prompt)
        ids = [self._register(key, ref) for key, ref in refs]
        self.data.pairs.append((prompt, ids[0], ids[1], record.confidence))

    def _register(self, key: Any, ref: ImageRef) -> int:
        image_id = self._image_ids.setdefault(key, len(self._image_ids))
        if image_id == len(self.data.images):
            self.data.images.append(ref)
        return image_id

    def _image(self, value: Any, base: Path, from_table: bool, record: _Record, column: str
               ) -> tuple[Any, ImageRef]:
        """(dedup key, reference) of one image cell; raises _BadRow when missing or unreadable."""
        if from_table:
            if not isinstance(value, str) or not value.strip():
                raise _BadRow("malformed_row", f"{record.where}: {column} must be an image path, got {value!r:.60}")
            path = (base / value.strip()).resolve()
            key: Any = str(path)
            ref: ImageRef = path
            source: Any = path
        else:  # parquet: the cell holds the image bytes (or an {"bytes": ...} struct)
            if isinstance(value, dict):
                value = value.get("bytes")
            if not isinstance(value, (bytes, bytearray)) or not value:
                raise _BadRow("malformed_row", f"{record.where}: column {column} holds no image bytes")
            key = ("sha1", hashlib.sha1(value).hexdigest())
            ref = ParquetImage(base, record.row, column)
            source = bytes(value)
        if key not in self._image_ok:
            self._image_ok[key] = _check_image(source, self.check_images)
        reason = self._image_ok[key]
        if reason is not None:
            raise _BadRow(reason, f"{record.where}: {column} image {describe_image(ref)} is {reason.replace('_', ' ')}")
        return key, ref


def _check_image(source: Path | bytes, check: bool) -> str | None:
    """None if the image looks readable (header only), else the skip reason."""
    if isinstance(source, Path) and not source.is_file():
        return "missing_image"
    if not check:
        return None
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            img.size  # noqa: B018  (the header parsed)
    except (OSError, ValueError, Image.DecompressionBombError):
        return "unreadable_image"
    return None


def describe_image(ref: ImageRef) -> str:
    """A human-readable location of an image: its path, or parquet file, row and column."""
    return f"{ref.path} row {ref.row} column {ref.column}" if isinstance(ref, ParquetImage) else str(ref)


def load_preferences(files: list[str | Path], limit: int | None = None, check_images: bool = True
                     ) -> PreferenceData:
    """Read preference pairs from data files (the first `limit` usable pairs); bad rows are counted and skipped.

    `check_images` opens each unique image's header once so unreadable files are skipped here;
    images that only fail to decode later are the caller's to count.
    """
    if limit is not None and limit < 1:
        raise DRMError(f"--limit must be >= 1, got {limit}")
    builder = _Builder(check_images)
    for file in files:
        path = Path(file).resolve()
        builder.data.sources.append(str(path))
        for item, base, from_table in _records(path):
            if limit is not None and len(builder.data.pairs) >= limit:
                break
            try:
                if isinstance(item, _BadRow):
                    raise item
                builder.add(item, base, from_table)
            except _BadRow as bad:
                builder.skip(bad.reason, str(bad))
    data = builder.data
    skipped = ", ".join(f"{n} {k}" for k, n in sorted(data.skipped.items()))
    log.info("loaded %d pairs, %d unique prompts, %d unique images from %d data file(s)%s", len(data.pairs),
             len(data.prompts), len(data.images), len(files), f"; skipped {skipped}" if skipped else "")
    return data


def _records(path: Path) -> Iterator[tuple[_Record | _BadRow, Path, bool]]:
    """(record or bad row, base folder or parquet file, is-table) for every row of one data file or folder."""
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise DRMError(f"--data {path}: folder holds no .parquet shards")
        for shard in shards:
            yield from _parquet_records(shard)
        return
    if not path.is_file():
        raise DRMError(f"--data {path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(path)
    elif suffix in TABLE_SUFFIXES:
        for where, row in _table_rows(path, suffix):
            yield _table_record(row, where), path.parent, True
    else:
        raise DRMError(f"--data {path}: unknown format {suffix!r}; expected .jsonl, .json, .csv, .parquet "
                       "or a folder of .parquet shards")


@dataclass
class _Unparsable:
    error: str


def _table_rows(path: Path, suffix: str) -> Iterator[tuple[str, Any]]:
    """(location, raw row) for every row of a JSONL / JSON / CSV file; bad JSONL lines become _Unparsable."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DRMError(f"--data {path}: cannot read ({err})") from err
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"{path} line {n}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path} line {n}", _Unparsable(str(err))
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DRMError(f"--data {path}: not valid JSON ({err})") from err
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DRMError(f"--data {path}: expected a JSON list of records (or {{\"data\": [...]}})")
        for n, row in enumerate(rows):
            yield f"{path} item {n}", row
    else:
        for n, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):
            yield f"{path} line {n}", row


def _table_record(row: Any, where: str) -> _Record | _BadRow:
    """One JSON/CSV row as a generic {prompt, chosen, rejected} or HPSv3 {prompt, path1, path2} record."""
    if isinstance(row, _Unparsable):
        return _BadRow("malformed_row", f"{where}: not valid JSON ({row.error})")
    if not isinstance(row, dict):
        return _BadRow("malformed_row", f"{where}: expected an object, got {type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        columns = ("chosen", "rejected")
    elif "path1" in row or "path2" in row:
        columns = ("path1", "path2")
    else:
        return _BadRow("malformed_row", f"{where}: needs keys prompt, chosen, rejected (or prompt, path1, "
                                        f"path2 for HPSv3); got {sorted(map(str, row))[:8]}")
    missing = [k for k in ("prompt", *columns) if row.get(k) is None]
    if missing:
        return _BadRow("malformed_row", f"{where}: missing {missing}")
    try:
        confidence = _confidence(row.get("confidence"), where)
    except _BadRow as bad:
        return bad
    return _Record(row["prompt"], row[columns[0]], row[columns[1]], confidence, where, columns)


def _confidence(value: Any, where: str) -> float:
    """A finite non-negative confidence (missing or empty -> 1.0); raises _BadRow otherwise."""
    if value is None or value == "":
        return 1.0
    if isinstance(value, bool):
        raise _BadRow("malformed_row", f"{where}: confidence must be a number, got {value!r}")
    try:
        conf = float(value)
    except (TypeError, ValueError):
        raise _BadRow("malformed_row", f"{where}: confidence must be a number, got {value!r:.40}") from None
    if not math.isfinite(conf) or conf < 0:
        raise _BadRow("malformed_row", f"{where}: confidence must be a finite number >= 0, got {value!r:.40}")
    return conf


def _parquet_records(path: Path) -> Iterator[tuple[_Record | _BadRow, Path, bool]]:
    """Pick-a-Pic rows of one parquet shard as winner-first records; ties and bad labels as bad rows."""
    shard = _open_parquet(path)
    missing = [c for c in PICKAPIC_COLUMNS if c not in shard.schema_arrow.names]
    if missing:
        raise DRMError(f"--data {path}: Pick-a-Pic parquet needs columns {list(PICKAPIC_COLUMNS)}; "
                       f"missing {missing}")
    row = 0
    for batch in shard.iter_batches(batch_size=64, columns=list(PICKAPIC_COLUMNS)):
        for item in batch.to_pylist():
            yield _pickapic_record(item, path, row), path, False
            row += 1


def _pickapic_record(item: dict, path: Path, row: int) -> _Record | _BadRow:
    """label_0 = 1: image 0 wins; 0: image 1 wins; 0.5: tie (skipped)."""
    where, label = f"{path} row {row}", item.get("label_0")
    if isinstance(label, (int, float)) and not isinstance(label, bool) and label == 0.5:
        return _BadRow("tie", f"{where}: tie (label_0 = 0.5)")
    if isinstance(label, bool) or label not in (0, 1):
        return _BadRow("malformed_row", f"{where}: label_0 must be 0, 0.5 or 1, got {label!r:.40}")
    columns = ("jpg_0", "jpg_1") if label == 1 else ("jpg_1", "jpg_0")
    return _Record(item.get("caption"), item.get(columns[0]), item.get(columns[1]), 1.0, where, columns, row)


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq  # optional dependency (training extra)

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DRMError(f"--data {path}: cannot read parquet ({err})") from err


class ImageReader:
    """Opens image references as RGB PIL images; parquet cells are read one row group at a time."""

    def __init__(self) -> None:
        self._group: tuple[Path, int] | None = None
        self._cells: dict[str, list[Any]] = {}
        self._starts: dict[Path, list[int]] = {}

    def open(self, ref: ImageRef) -> Image.Image:
        """The decoded RGB image; raises OSError / ValueError when it cannot be decoded."""
        source = ref if isinstance(ref, Path) else io.BytesIO(self.read_bytes(ref))
        with Image.open(source) as img:
            return img.convert("RGB")

    def read_bytes(self, ref: ParquetImage) -> bytes:
        """The raw bytes in one parquet cell (its row group stays cached for the next calls)."""
        if ref.path not in self._starts:
            meta = _open_parquet(ref.path).metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            self._starts[ref.path] = [sum(sizes[:i]) for i in range(len(sizes))]
        starts = self._starts[ref.path]
        group = bisect.bisect_right(starts, ref.row) - 1
        if self._group != (ref.path, group):
            self._group, self._cells = (ref.path, group), {}
        if ref.column not in self._cells:
            table = _open_parquet(ref.path).read_row_group(group, columns=[ref.column])
            self._cells[ref.column] = table.column(0).to_pylist()
        value = self._cells[ref.column][ref.row - starts[group]]
        return value.get("bytes") if isinstance(value, dict) else value
