"""Checks for LLaVA training records, so that a bad record fails with its index, not at step 3,000.

A record is ``{"id", "image" (optional, relative to the image folder),
"conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

ROLES = ("human", "gpt")
IMAGE_TAG = "<image>"


class RecordError(ValueError):
    """A training record is malformed; the message names the record and the problem."""


def validate_record(record, image_folder: str | os.PathLike | None, index: int = 0, *, check_files: bool = True) -> None:
    """Raise :class:`RecordError` when ``record`` is not a usable LLaVA record."""
    where = f"record {index}" + (f" (id {record.get('id')!r})" if isinstance(record, dict) and "id" in record else "")
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected an object, got {type(record).__name__}")
    for key in ("id", "conversations"):
        if key not in record:
            raise RecordError(f"{where}: missing key {key!r}")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: 'conversations' must be a non-empty list")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise RecordError(f"{where}: turn {k} must be {{'from': 'human'|'gpt', 'value': str}}")
        if turn["from"] != ROLES[k % 2]:
            raise RecordError(f"{where}: turn {k} should come from {ROLES[k % 2]!r} (turns alternate)")
    tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
    if "image" in record:
        image = record["image"]
        if not isinstance(image, str) or not image:
            raise RecordError(f"{where}: 'image' must be a relative path")
        if tags != 1:
            raise RecordError(f"{where}: a record with an image needs exactly one {IMAGE_TAG} tag, found {tags}")
        if image_folder is not None:
            folder = Path(image_folder).resolve()
            path = (folder / image).resolve()
            if os.path.isabs(image) or folder not in path.parents:
                raise RecordError(f"{where}: image path {image!r} points outside the image folder {folder}")
            if check_files and not path.is_file():
                raise RecordError(f"{where}: image file {path} does not exist")
    elif tags:
        raise RecordError(f"{where}: {IMAGE_TAG} tag without an 'image' key")


def validate_records(records: Iterable, image_folder=None, *, check_files: bool = True) -> int:
    """Validate every record; return how many there are."""
    count = 0
    for index, record in enumerate(records):
        validate_record(record, image_folder, index, check_files=check_files)
        count += 1
    if count == 0:
        raise RecordError("the dataset has no records")
    return count


def load_records(json_path, image_folder=None, *, check_files: bool = True) -> list:
    """Read a LLaVA JSON file and validate it."""
    try:
        records = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecordError(f"{json_path}: not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise RecordError(f"{json_path}: expected a JSON list of records")
    validate_records(records, image_folder, check_files=check_files)
    return records


def write_records(records: list, json_path, image_folder) -> Path:
    """Validate, then write records as LLaVA JSON."""
    validate_records(records, image_folder)
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
