"""Writing a caption corpus as WebDataset shards, the layout :mod:`pretrain.data.shards` reads.

Sources: a COCO captions JSON, or a table (CSV, TSV or parquet) with columns ``image`` (a path
relative to the image root) and ``caption``, one row per caption; all rows of one image become
one sample, with its captions in row order, images in order of first appearance.

Each sample ``{key}`` (``000000000``, ``000000001``, ... in source order) is written as
``{key}.jpg`` (the image file's own bytes; PNG and WebP keep their extension, any other format
is re-encoded as PNG), ``{key}.txt`` (the captions, one a line) and ``{key}.json``
(``image``, ``captions`` and, from COCO, ``image_id``), ``shard_size`` samples to
``{shard:05d}.tar``. The same input always gives byte-identical shards (fixed member order,
owner and time). Images that are missing or do not decode, and rows without a caption, are
left out and reported by file. ``shards.txt`` lists the shards (a ``DATA.SHARDS`` value) and
``make_shards.json`` records counts and everything left out.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from pretrain.data.captions import read_caption_records
from pretrain.data.images import load_rgb_image
from pretrain.errors import (
    BadValueError,
    MissingInputError,
    OutputExistsError,
    is_machine_fault,
)
from pretrain.files import atomic_write, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("image", "caption")
_KEPT_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_MTIME = 0  # tar members' time: fixed, so the output depends on the input only


@dataclass(frozen=True)
class CorpusImage:
    """One image of a corpus: its path relative to the image root and its captions."""

    file_name: str
    captions: tuple[str, ...]
    image_id: int | None = None


@dataclass
class ShardReport:
    """What :func:`write_shards` wrote and what it left out (``(file, reason)`` pairs)."""

    shards: list[Path] = field(default_factory=list)
    num_samples: int = 0
    left_out: list[tuple[str, str]] = field(default_factory=list)


def read_coco_corpus(captions_json: str | os.PathLike) -> list[CorpusImage]:
    """The captioned images of a COCO captions file, sorted by image id."""
    return [CorpusImage(r.file_name, r.captions, r.image_id) for r in read_caption_records(captions_json)]


def _require_path_column(table, path: Path) -> None:
    """Refuse a parquet table whose ``image`` column holds something else than paths: the images
    themselves (Hugging Face ``datasets`` save an image column as ``{bytes, path}``, img2dataset's
    parquet output as bytes). Every row was "no image" and the stop blamed --image-root."""
    import pyarrow as pa

    if "image" not in table.column_names:
        return  # named with the other missing columns
    kind = table.schema.field("image").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise BadValueError(f"{path}: column image holds {kind}, not file paths under --image-root (the images "
                            "themselves?); write each image to a file and put its path in the column")


def _table_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq  # only parquet tables need it

        table = pq.read_table(path)
        columns = table.column_names
        _require_path_column(table, path)
        rows = table.to_pylist()
    elif path.suffix.lower() in (".csv", ".tsv"):
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark that would stick to the first column's name
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
            try:
                columns, rows = _delimited_rows(reader, path)
            except UnicodeDecodeError as err:
                raise BadValueError(f"{path}: not UTF-8 text (it has the byte {err.object[err.start]:#x}); save "
                                    "the table as UTF-8") from None
    else:
        raise BadValueError(f"{path}: not a .csv, .tsv or .parquet file")
    missing = [c for c in TABLE_COLUMNS if c not in columns]
    if missing:
        raise BadValueError(f"{path}: needs columns {', '.join(TABLE_COLUMNS)}; missing {', '.join(missing)} (has {', '.join(map(str, columns))})")
    if not rows:
        raise BadValueError(f"{path}: the table has a header but no rows; add one row per image and caption")
    return rows


_QUOTING_HELP = ("a field that starts with a double quote is quoted up to the next one; quote the whole "
                 "field and double the quotes inside (\"\"), as pandas and Excel save them, or remove the quote")


def _delimited_rows(reader: csv.DictReader, path: Path) -> tuple[list[str], list[dict]]:
    """The column names and rows of a CSV/TSV ``reader`` (strict quoting), refusing quoting that
    went wrong.

    Why: a caption that starts with a double quote it does not close (``"Tiny" house``, common
    in scraped captions) makes the csv module read on across tabs, commas and line breaks until
    some later quote: rows were silently merged into one caption and their images lost. Strict
    mode stops on a quote followed by other text; a field that holds a line break and then the
    column separator is the same runaway closed by chance at the end of a later field.
    """
    rows, start = [], 1
    try:
        columns = reader.fieldnames or []
        start = reader.line_num + 1
        for row in reader:
            for value in row.values():
                if isinstance(value, str) and reader.reader.dialect.delimiter in value.partition("\n")[2]:
                    raise BadValueError(f"{path}: line {start}: a quoted field runs over lines {start}-{reader.line_num} "
                                        f"and swallows their rows; {_QUOTING_HELP}")
            rows.append(row)
            start = reader.line_num + 1
    except csv.Error as err:
        raise BadValueError(f"{path}: line {start}: malformed quoting ({str(err).replace(chr(9), 'tab')}); "
                            f"{_QUOTING_HELP}") from None
    return columns, rows


def read_table_corpus(path: str | os.PathLike, left_out: list[tuple[str, str]]) -> list[CorpusImage]:
    """The images of a caption table, captions grouped per image in row order; rows without an
    image or caption are appended to ``left_out`` as ``("{path}:{row}", reason)``."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: caption table not found")
    captions: dict[str, list[str]] = {}
    for number, row in enumerate(_table_rows(path), start=2 if path.suffix.lower() != ".parquet" else 1):
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image.strip():
            left_out.append((f"{path}:{number}", "no image"))
            continue
        if not isinstance(caption, str) or not caption.strip():
            left_out.append((f"{path}:{number}", f"empty caption for {image}"))
            continue
        captions.setdefault(image.strip(), []).append(caption.strip())
    return [CorpusImage(image, tuple(texts)) for image, texts in captions.items()]


def _image_entry(path: Path) -> tuple[str, bytes]:
    """``(extension, bytes)`` to store for an image file, after checking that it decodes."""
    data = path.read_bytes()
    image = load_rgb_image(io.BytesIO(data), name=str(path))
    extension = _KEPT_EXTENSIONS.get(path.suffix.lower())
    if extension is not None:
        return extension, data
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _sample(key: str, image: CorpusImage, extension: str, data: bytes) -> dict:
    meta = {"image": image.file_name, "captions": list(image.captions)}
    if image.image_id is not None:
        meta["image_id"] = image.image_id
    text = "\n".join(" ".join(caption.split()) for caption in image.captions)  # one caption a line
    return {"__key__": key, extension: data, "txt": text.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}


def write_shards(
    images: Iterable[CorpusImage],
    image_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    shard_size: int,
    force: bool = False,
    left_out: list[tuple[str, str]] | None = None,
) -> ShardReport:
    """Write ``images`` (paths relative to ``image_root``) as shards of ``shard_size`` samples
    into ``output_dir``; ``left_out`` holds what the caller already left out (table rows).

    A folder that already holds shards is refused unless ``force``. Each shard is written
    atomically; the report is also saved as ``make_shards.json`` next to ``shards.txt``. A
    progress bar counts the images (every one is read and decoded: COCO's 118K take a while).
    """
    if shard_size < 1:
        raise BadValueError(f"--shard-size must be at least 1, got {shard_size}")
    image_root, output_dir = Path(image_root), Path(output_dir)
    if not image_root.is_dir():
        raise MissingInputError(f"{image_root}: image folder not found")
    output_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(output_dir.glob("*.tar"))
    if existing and not force:
        raise OutputExistsError(f"{existing[0]}: {output_dir} already holds shards (pass --force to replace them)")
    for old in [*existing, output_dir / "shards.txt", output_dir / "make_shards.json"]:
        old.unlink(missing_ok=True)  # the listing too: it named the shards removed here until a new run ended
    report = ShardReport(left_out=list(left_out or []))
    pending: list[dict] = []

    def flush() -> None:
        path = output_dir / f"{len(report.shards):05d}.tar"
        with atomic_write(path, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=_MTIME) as writer:
            for sample in pending:
                writer.write(sample)
        report.shards.append(path)
        pending.clear()

    for image in tqdm(images, desc="shards", unit="image", mininterval=2.0):
        path = image_root / image.file_name
        try:
            extension, data = _image_entry(path)
        except FileNotFoundError:
            report.left_out.append((str(path), "image file not found"))
            continue
        except OSError as err:  # a BadImageError, or the file's own read error; not the machine's
            if is_machine_fault(err):
                raise
            report.left_out.append((str(path), str(err).split(": ", 1)[-1]))
            continue
        pending.append(_sample(f"{report.num_samples:09d}", image, extension, data))
        report.num_samples += 1
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not report.num_samples:
        first = f"; the first: {report.left_out[0][0]}: {report.left_out[0][1]}" if report.left_out else ""
        raise BadValueError(f"{image_root}: none of the images could be read ({len(report.left_out)} left out{first})")
    write_text_atomic(output_dir / "shards.txt", "".join(f"{p.name}\n" for p in report.shards))
    write_json_atomic(output_dir / "make_shards.json", {
        "samples": report.num_samples,
        "shards": [p.name for p in report.shards],
        "shard_size": shard_size,
        "left_out": [{"file": name, "reason": reason} for name, reason in report.left_out],
    })
    return report
