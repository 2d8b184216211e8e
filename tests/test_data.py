"""Preference data loading: every layout, winner/loser order, dedup, and bad rows counted and skipped."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from drm_core import DRMError
from training.data import ImageReader, ParquetImage, load_preferences


def png(path: Path | None, color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    """A tiny PNG (written to `path` when given); returns its bytes."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i, name in enumerate("abcd"):
        png(root / "img" / f"{name}.png", (60 * i, 10, 200 - 40 * i))
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG not really an image")
    return root


def names(data, pair: int) -> tuple[str, str, str]:
    prompt, win, lose, _ = data.pairs[pair]
    return data.prompts[prompt], data.images[win].name, data.images[lose].name


def test_jsonl_generic_layout_with_bad_rows(images: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"prompt": "a cat", "chosen": "img/a.png", "rejected": "img/b.png"},
            {"prompt": "a cat", "chosen": "img/c.png", "rejected": "img/a.png", "confidence": 0.7},
            {"prompt": "a dog", "chosen": "img/missing.png", "rejected": "img/a.png"},
            {"prompt": "a dog", "chosen": "img/corrupt.png", "rejected": "img/a.png"},
            {"prompt": "a dog", "chosen": "img/a.png"},
            {"prompt": 3, "chosen": "img/a.png", "rejected": "img/b.png"},
            {"prompt": "x", "chosen": "img/a.png", "rejected": "img/b.png", "confidence": "high"},
            {"prompt": "x", "chosen": "img/a.png", "rejected": "./img/a.png"},
            {"prompt": "a dog", "chosen": "img/d.png", "rejected": "img/b.png"}]
    lines = [json.dumps(r) for r in rows[:4]] + ["{not json", ""] + [json.dumps(r) for r in rows[4:]]
    path = images / "prefs.jsonl"
    path.write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING):
        data = load_preferences([path])
    assert [names(data, i) for i in range(len(data.pairs))] == [
        ("a cat", "a.png", "b.png"), ("a cat", "c.png", "a.png"), ("a dog", "d.png", "b.png")]
    assert [p[3] for p in data.pairs] == [1.0, 0.7, 1.0]
    assert data.prompts == ["a cat", "a dog"]  # deduplicated
    assert [r.name for r in data.images] == ["a.png", "b.png", "c.png", "d.png"]  # each image once
    assert all(r.is_absolute() and r.is_file() for r in data.images)  # resolved relative to the data file
    assert dict(data.skipped) == {"missing_image": 1, "unreadable_image": 1, "malformed_row": 4, "same_image": 1}
    assert f"{path} line 5" in caplog.text and "not valid JSON" in caplog.text  # names the file and row
    assert "missing.png" in caplog.text and "corrupt.png" in caplog.text
    assert "missing ['rejected']" in caplog.text


def test_json_list_and_csv_layouts(images: Path) -> None:
    rows = [{"prompt": "red", "chosen": "img/a.png", "rejected": "img/b.png"},
            {"prompt": "blue", "chosen": "img/b.png", "rejected": "img/c.png", "confidence": 0.5}]
    (images / "prefs.json").write_text(json.dumps(rows))
    with open(images / "prefs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected", "confidence"])
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({"prompt": "green", "chosen": "img/a.png", "rejected": "", "confidence": ""})
    from_json = load_preferences([images / "prefs.json"])
    from_csv = load_preferences([images / "prefs.csv"])
    for data in (from_json, from_csv):
        assert [names(data, i) for i in range(2)] == [("red", "a.png", "b.png"), ("blue", "b.png", "c.png")]
        assert [p[3] for p in data.pairs] == [1.0, 0.5]
    assert dict(from_csv.skipped) == {"malformed_row": 1}
    both = load_preferences([images / "prefs.json", images / "prefs.csv"])  # dedup across files
    assert len(both.pairs) == 4 and len(both.prompts) == 2 and len(both.images) == 3


def test_hpsv3_layout_path1_wins(tmp_path: Path, images: Path) -> None:
    records = [{"prompt": "a tree", "path1": "img/c.png", "path2": "img/d.png", "confidence": 0.9,
                "model1": "x", "model2": "y"},
               {"prompt": "a tree", "path1": "img/d.png", "path2": "img/a.png", "confidence": -1}]
    sub = images / "meta"
    sub.mkdir()
    (sub / "train.json").write_text(json.dumps(records).replace("img/", "../img/"))
    data = load_preferences([sub / "train.json"])
    assert [names(data, 0)] == [("a tree", "c.png", "d.png")] and data.pairs[0][3] == pytest.approx(0.9)
    assert dict(data.skipped) == {"malformed_row": 1}  # negative confidence


def pickapic(path: Path, rows: list[dict], row_group_size: int = 2) -> None:
    table = pa.table({"caption": [r["caption"] for r in rows],
                      "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
                      "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
                      "label_0": pa.array([r["label_0"] for r in rows], pa.float64()),
                      "label_1": pa.array([None if r["label_0"] is None else 1 - r["label_0"] for r in rows])})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def test_pickapic_parquet(tmp_path: Path) -> None:
    red, green, blue = (png(None, c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    rows = [{"caption": "p0", "jpg_0": red, "jpg_1": green, "label_0": 1.0},
            {"caption": "p1", "jpg_0": red, "jpg_1": blue, "label_0": 0.0},
            {"caption": "p2", "jpg_0": green, "jpg_1": blue, "label_0": 0.5},  # tie
            {"caption": "p3", "jpg_0": b"garbage", "jpg_1": blue, "label_0": 1.0},  # corrupt image
            {"caption": "p4", "jpg_0": green, "jpg_1": blue, "label_0": None},  # malformed label
            {"caption": "p1", "jpg_0": blue, "jpg_1": green, "label_0": 1.0}]
    pickapic(tmp_path / "shards" / "train-0000.parquet", rows[:3])
    pickapic(tmp_path / "shards" / "train-0001.parquet", rows[3:])
    data = load_preferences([tmp_path / "shards"])
    reader = ImageReader()
    colour = [reader.open(ref).getpixel((0, 0)) for ref in data.images]
    assert [(data.prompts[p], colour[w], colour[l]) for p, w, l, _ in data.pairs] == [
        ("p0", (255, 0, 0), (0, 255, 0)), ("p1", (0, 0, 255), (255, 0, 0)), ("p1", (0, 0, 255), (0, 255, 0))]
    assert len(data.images) == 3  # identical bytes kept once
    assert all(isinstance(ref, ParquetImage) for ref in data.images)
    assert dict(data.skipped) == {"tie": 1, "unreadable_image": 1, "malformed_row": 1}
    single = load_preferences([tmp_path / "shards" / "train-0000.parquet"])
    assert len(single.pairs) == 2


def test_limit_takes_first_pairs(images: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": "img/a.png", "rejected": f"img/{'bcd'[i % 3]}.png"} for i in range(6)]
    (images / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_preferences([images / "prefs.jsonl"], limit=4)
    assert [data.prompts[p[0]] for p in data.pairs] == ["p0", "p1", "p2", "p3"]


def test_bad_files_raise(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "cols.parquet")
    for name, message in [("x.txt", "unknown format"), ("bad.json", "not valid JSON"),
                          ("obj.json", "expected a JSON list"), ("nope.jsonl", "no such file"),
                          ("cols.parquet", "missing ['jpg_0', 'jpg_1', 'label_0']")]:
        with pytest.raises(DRMError, match=re.escape(message)):
            load_preferences([tmp_path / name])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DRMError, match="no .parquet shards"):
        load_preferences([tmp_path / "empty"])
