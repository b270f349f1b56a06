"""Checks for LLaVA training records, so that a bad record fails with its index, not at step 3,000.

A record is ``{"image" (optional, relative to the image folder), "conversations": [{"from":
"human"|"gpt", "value": str}, ...]}``; ``"id"`` and any other key are optional (LLaVA never
reads them). The rules are those of LLaVA's own ``LazySupervisedDataset`` and ``preprocess``,
which read the turns differently per conversation template (``--version``, :func:`turn_style`):
a record is refused when LLaVA would crash on it or silently train on something other than
the record (its image never spliced in, another sample's image, a blank image, the tag read as
text); whatever else LLaVA trains on is accepted.

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

#: how LLaVA's ``preprocess`` reads the turns (:func:`turn_style`): ``chat`` (v1, llama_2, mpt: a
#: leading turn not from 'human' is dropped, then 'human' and 'gpt' alternate; any other role
#: crashes), ``plain`` (pretraining: exactly two turns, the first holds <image>, roles not read),
#: ``free`` (v0's template: any role names, in any order)
STYLES = ("chat", "plain", "free")

#: problem kinds :func:`record_problem` can report, in the order they are checked
PROBLEM_KINDS = ("not_an_object", "missing_key", "bad_turns", "bad_text", "plain_without_image",
                 "image_tag_count", "tag_without_image", "bad_image_path", "outside_image_folder",
                 "missing_image_file")


class RecordError(ValueError):
    """A training record is malformed; the message names the record and the problem."""


def turn_style(template) -> str:
    """The :data:`STYLES` entry for a LLaVA conversation template (``llava.conversation.Conversation``),
    following LLaVA's ``preprocess`` dispatch."""
    style = getattr(getattr(template, "sep_style", None), "name", "")
    version = str(getattr(template, "version", ""))
    if style == "PLAIN":
        return "plain"
    if style == "LLAMA_2" or version.startswith("v1") or version == "mpt":
        return "chat"
    return "free"


def _bad_text(value: str) -> Optional[int]:
    """The position of the first character that is not valid Unicode (a lone surrogate), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _turn_problem(record: dict, style: str) -> tuple[Optional[tuple[str, str]], list]:
    """``(problem or None, the turns LLaVA trains on)``."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        return ("bad_turns", "'conversations' must be a non-empty list"), []
    for k, turn in enumerate(turns):  # the plain template never reads 'from'
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) \
                or (style != "plain" and not isinstance(turn.get("from"), str)):
            return ("bad_turns", f"turn {k} must be {{'from': 'human'|'gpt', 'value': str}}"), []
        at = _bad_text(turn["value"])
        if at is not None:
            return ("bad_text", f"turn {k} holds text that is not valid Unicode (a lone surrogate at "
                                f"character {at}); the tokenizer cannot encode it"), []
    if style == "plain":
        if len(turns) != 2:
            return ("bad_turns", f"the plain template (pretraining) takes exactly two turns, the {IMAGE_TAG} "
                                 f"turn and the caption; found {len(turns)}"), []
        if IMAGE_TAG not in turns[0]["value"]:
            return ("bad_turns", f"turn 0 should hold {IMAGE_TAG} (plain template: the {IMAGE_TAG} turn, "
                                 "then the caption)"), []
        return None, turns
    if style == "free":
        return None, turns
    for k, turn in enumerate(turns):
        if turn["from"] not in ROLES:
            return ("bad_turns", f"turn {k} comes from {turn['from']!r}; allowed: 'human' or 'gpt' "
                                 "(LLaVA's template has no other role)"), []
    first = 0 if turns[0]["from"] == ROLES[0] else 1  # LLaVA drops a leading turn not from 'human'
    kept = turns[first:]
    if not kept:
        return ("bad_turns", f"turn 0 should come from {ROLES[0]!r} (LLaVA drops a leading {ROLES[1]!r} turn, "
                             "and nothing is left after it)"), []
    for j, turn in enumerate(kept):
        if turn["from"] != ROLES[j % 2]:
            return ("bad_turns", f"turn {first + j} should come from {ROLES[j % 2]!r} (turns alternate"
                                 f"{', after the leading gpt turn LLaVA drops' if first else ''})"), []
    return None, kept


def record_problem(record, image_folder: Optional[str], *, check_files: bool = True,
                   style: str = "chat") -> Optional[tuple[str, str]]:
    """``(kind, detail)`` of the first problem of ``record``, or None when it is usable.

    ``style``: how LLaVA's template reads the turns (:data:`STYLES`, :func:`turn_style`).
    ``image_folder`` must be an absolute, normalised path (or None to skip the path
    checks). Paths are checked lexically (``..`` may not leave the folder); symbolic links
    inside the folder are followed, as LLaVA's loader does.
    """
    if not isinstance(record, dict):
        return "not_an_object", f"expected an object, got {type(record).__name__}"
    if "conversations" not in record:
        return "missing_key", "missing key 'conversations'"
    problem, kept = _turn_problem(record, style)
    if problem is not None:
        return problem
    dropped = record["conversations"][:len(record["conversations"]) - len(kept)]
    tagged = [k for k, turn in enumerate(kept) if IMAGE_TAG in turn["value"]]
    if "image" not in record:
        if style == "plain":
            return "plain_without_image", ("the plain template (pretraining) needs an image in every record "
                                           f"(its {IMAGE_TAG} would splice in a blank one)")
        if tagged or any(IMAGE_TAG in turn["value"] for turn in dropped):
            return "tag_without_image", (f"{IMAGE_TAG} tag without an 'image' key (LLaVA would read the tag as "
                                         "text)")
        return None
    image = record["image"]
    if not isinstance(image, str) or not image or _bad_text(image) is not None:
        return "bad_image_path", "'image' must be a relative path (one image per record)"
    if style == "plain" and IMAGE_TAG in kept[1]["value"]:
        return "image_tag_count", f"the caption (turn 1) holds {IMAGE_TAG}: LLaVA would splice a second image in"
    if len(tagged) != 1:
        where = (f"; the one in turn 0 is in the leading {ROLES[1]!r} turn that LLaVA drops"
                 if any(IMAGE_TAG in turn["value"] for turn in dropped) else "")
        return "image_tag_count", (f"a record with an image needs {IMAGE_TAG} in exactly one turn, "
                                   f"found it in {len(tagged)}{where}")
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
