"""Checks for LLaVA training records, so that a bad record fails with its index, not at step 3,000.

A record is ``{"id", "image" (optional, relative to the image folder),
"conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.

:func:`record_problem` is the one rule set. It is used by the data pre-flight that runs
before training (:mod:`basic_plugin.host.preflight`, all records, counted per problem) and by
the demo's data builders (:func:`validate_records`, first problem raised).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

ROLES = ("human", "gpt")
IMAGE_TAG = "<image>"

#: problem kinds :func:`record_problem` can report, in the order they are checked
PROBLEM_KINDS = ("not_an_object", "missing_key", "bad_turns", "image_tag_count", "tag_without_image",
                 "bad_image_path", "outside_image_folder", "missing_image_file")


class RecordError(ValueError):
    """A training record is malformed; the message names the record and the problem."""


def record_problem(record, image_folder: Optional[str], *, check_files: bool = True) -> Optional[tuple[str, str]]:
    """``(kind, detail)`` of the first problem of ``record``, or None when it is usable.

    ``image_folder`` must be an absolute, normalised path (or None to skip the path
    checks). Paths are checked lexically (``..`` may not leave the folder); symbolic links
    inside the folder are followed, as LLaVA's loader does.
    """
    if not isinstance(record, dict):
        return "not_an_object", f"expected an object, got {type(record).__name__}"
    for key in ("id", "conversations"):
        if key not in record:
            return "missing_key", f"missing key {key!r}"
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        return "bad_turns", "'conversations' must be a non-empty list"
    tags = 0
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            return "bad_turns", f"turn {k} must be {{'from': 'human'|'gpt', 'value': str}}"
        if turn["from"] != ROLES[k % 2]:
            return "bad_turns", f"turn {k} should come from {ROLES[k % 2]!r} (turns alternate)"
        tags += turn["value"].count(IMAGE_TAG)
    if "image" not in record:
        if tags:
            return "tag_without_image", f"{IMAGE_TAG} tag without an 'image' key"
        return None
    image = record["image"]
    if not isinstance(image, str) or not image:
        return "bad_image_path", "'image' must be a relative path"
    if tags != 1:
        return "image_tag_count", f"a record with an image needs exactly one {IMAGE_TAG} tag, found {tags}"
    if image_folder is None:
        return None
    path = os.path.normpath(os.path.join(image_folder, image))
    if os.path.isabs(image) or not path.startswith(image_folder.rstrip(os.sep) + os.sep):
        return "outside_image_folder", f"image path {image!r} points outside the image folder {image_folder}"
    if check_files and not os.path.isfile(path):
        return "missing_image_file", f"image file {path} does not exist"
    return None


def record_label(record, index: int) -> str:
    """How messages name a record: its index, and its id when it has one."""
    return f"record {index}" + (f" (id {record.get('id')!r})" if isinstance(record, dict) and "id" in record else "")


def normalised_folder(image_folder) -> Optional[str]:
    return None if image_folder is None else os.path.normpath(os.path.abspath(os.fspath(image_folder)))


def validate_record(record, image_folder: str | os.PathLike | None, index: int = 0, *, check_files: bool = True) -> None:
    """Raise :class:`RecordError` when ``record`` is not a usable LLaVA record."""
    problem = record_problem(record, normalised_folder(image_folder), check_files=check_files)
    if problem is not None:
        raise RecordError(f"{record_label(record, index)}: {problem[1]}")


def validate_records(records: Iterable, image_folder=None, *, check_files: bool = True) -> int:
    """Validate every record; return how many there are."""
    folder = normalised_folder(image_folder)
    count = 0
    for index, record in enumerate(records):
        problem = record_problem(record, folder, check_files=check_files)
        if problem is not None:
            raise RecordError(f"{record_label(record, index)}: {problem[1]}")
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
