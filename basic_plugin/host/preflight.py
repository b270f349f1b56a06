"""Data pre-flight: every training record checked before the model loads.

LLaVA reads a record's image only when the data loader reaches it, so a missing,
mis-suffixed or corrupt image, or a record LLaVA's ``preprocess`` cannot take, kills a
run hours in, and a resume replays the crash. The pre-flight reads ``--data_path`` once,
checks every record with :func:`basic_plugin.host.records.record_problem` (keys, turn order,
``<image>`` tags, image inside ``--image_folder`` and present), in ``full`` mode also
decodes every image in parallel worker processes, and runs LLaVA's own ``preprocess`` on
a sample (``fast``) or on every record (``full``) to find records that truncation at
``--model_max_length`` leaves with no supervised token.

The summary (counts per problem, the first records of each) goes to
``<output_dir>/preflight/report.json`` and to the log. Then the run stops (default), or,
with ``--skip_bad_records True``, trains on the good records, written to
``<output_dir>/preflight/train_data.json``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from basic_plugin.host.records import PROBLEM_KINDS, normalised_folder, record_label, record_problem, turn_style
from basic_plugin.host.refusal import Refusal

#: records whose token counts the ``fast`` mode checks (evenly spaced over the file)
FAST_TOKEN_SAMPLE = 1000
#: records named per problem kind in the report
FIRST_N = 5
REPORT_DIR = "preflight"

#: problem kinds beyond the record rules: ``undecodable`` (full mode), ``unprocessable``
#: (LLaVA's preprocess raised), ``fully_truncated`` (no supervised token left)
ALL_KINDS = (*PROBLEM_KINDS, "undecodable", "unprocessable", "fully_truncated")


class PreflightFailed(Refusal):
    """The data cannot be trained on as given; the message is the summary."""


@dataclass
class PreflightReport:
    """What the pre-flight found; ``bad`` holds the indices of unusable records."""

    mode: str
    data_path: str
    image_folder: Optional[str]
    records: int = 0
    bad: set = field(default_factory=set)
    counts: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    seconds: float = 0.0
    ids: dict = field(default_factory=dict)  # index -> record id, for the unusable records
    earliest: Optional[tuple] = None  # (index, message) of the unusable record nearest the top

    def add(self, kind: str, index: int, record, detail: str, *, fatal: bool = True) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if fatal:
            self.bad.add(index)
            self.ids[index] = record.get("id") if isinstance(record, dict) else None
            if self.earliest is None or index < self.earliest[0]:
                self.earliest = (index, f"{record_label(record, index)}: {detail}")
        examples = self.first.setdefault(kind, [])
        if len(examples) < FIRST_N:
            examples.append(f"{record_label(record, index)}: {detail}")

    def as_dict(self) -> dict:
        return {"mode": self.mode, "data_path": self.data_path, "image_folder": self.image_folder,
                "records": self.records, "unusable_records": len(self.bad), "counts": self.counts,
                "first": self.first, "tokens": self.tokens, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        head = (f"data pre-flight ({self.mode}) of {self.data_path}: {self.records} records, "
                f"{len(self.bad)} unusable")
        lines = [head]
        for kind in ALL_KINDS:
            if kind in self.counts:
                lines.append(f"  {kind}: {self.counts[kind]}")
                lines += [f"    {example}" for example in self.first.get(kind, [])]
        if self.tokens:
            lines.append(f"  token check: {self.tokens.get('note', '')}".rstrip())
        return "\n".join(lines)


#: files smaller than this are checked without a progress bar
PROGRESS_FROM = 5000


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled or total < PROGRESS_FROM:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="rec", mininterval=1.0, leave=False)


def load_data(data_path: str) -> list:
    """The records of a LLaVA JSON file, or :class:`PreflightFailed` naming the file."""
    try:
        with open(data_path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise PreflightFailed(f"--data_path {data_path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PreflightFailed(f"--data_path {data_path}: not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise PreflightFailed(f"--data_path {data_path}: expected a JSON list of records, "
                              f"got {type(records).__name__}")
    return records


def training_template(version: Optional[str]):
    """The conversation template LLaVA's ``train()`` trains with for ``--version`` (``v0`` and ``v0.5``
    keep the module's default, Vicuna v1; an unknown name falls back to it too)."""
    import llava.conversation as conversation_lib

    templates = conversation_lib.conv_templates
    return templates["vicuna_v1"] if version in (None, "v0", "v0.5") else templates.get(version, templates["vicuna_v1"])


def check_records(records: list, image_folder: Optional[str], report: PreflightReport, *, style: str = "chat",
                  progress: bool = False) -> None:
    """The record rules, for every record (``fast`` and ``full``), as LLaVA's template ``style`` reads them."""
    folder = normalised_folder(image_folder)
    for index, record in enumerate(_progress(records, len(records), "pre-flight: records", progress)):
        problem = record_problem(record, folder, style=style)
        if problem is not None:
            report.add(problem[0], index, record, problem[1])


def _decode(path: str) -> Optional[str]:
    """None when PIL decodes the whole image as LLaVA will (``convert('RGB')``), else why not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any failure is the finding
        return f"{type(error).__name__}: {error}"
    return None


def decode_images(records: list, image_folder: str, report: PreflightReport, *, workers: int,
                  progress: bool = False) -> None:
    """``full`` mode: decode every image of the records not already found bad, in ``workers`` processes."""
    folder = normalised_folder(image_folder)
    todo = [(i, os.path.join(folder, r["image"])) for i, r in enumerate(records)
            if i not in report.bad and isinstance(r, dict) and "image" in r]
    paths = [p for _, p in todo]
    if workers > 1 and len(paths) > 64:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.imap(_decode, paths, chunksize=64)
            results = list(_progress(results, len(paths), "pre-flight: images", progress))
    else:
        results = [_decode(p) for p in _progress(paths, len(paths), "pre-flight: images", progress)]
    for (index, path), error in zip(todo, results):
        if error is not None:
            report.add("undecodable", index, records[index], f"image {path} does not decode ({error})")


# ---------------------------------------------------------------- token counts
def image_token_count(model_args) -> Optional[int]:
    """Tokens one image becomes in the LLM input, read from the vision tower's files (no weights).

    ``(crop size // patch size)^2`` (+1 with ``cls_patch``); None when the tower's
    folder cannot be read, and the token check is then left out.
    """
    tower = getattr(model_args, "vision_tower", None)
    if not tower:
        return None
    try:
        from transformers.utils import cached_file

        def read(name):
            path = os.path.join(tower, name) if os.path.isdir(tower) else cached_file(
                tower, name, _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False)
            if not path or not os.path.isfile(path):
                return {}
            with open(path, encoding="utf-8") as f:
                return json.load(f)

        config = read("config.json")
        config = config.get("vision_config", config)
        processor = read("preprocessor_config.json")
        patch = int(config["patch_size"])
        crop = processor.get("crop_size") or config.get("image_size")
        if isinstance(crop, dict):
            crop = min(crop.get("height", math.inf), crop.get("width", math.inf))
        count = (int(crop) // patch) ** 2
    except Exception:  # noqa: BLE001 - an unreadable tower only disables the check
        return None
    return count + (1 if getattr(model_args, "mm_vision_select_feature", "patch") == "cls_patch" else 0)


def load_tokenizer(model_args, training_args):
    """The tokenizer as LLaVA's ``train()`` loads it (slow, right padding, unk as pad)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, cache_dir=getattr(training_args, "cache_dir", None),
        model_max_length=training_args.model_max_length, padding_side="right", use_fast=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def supervised_span(input_ids, labels, image_tokens: int) -> tuple[int, Optional[int]]:
    """``(spliced length, spliced position of the first supervised token or None)``.

    In the LLM input each image placeholder becomes ``image_tokens`` rows.
    """
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    position, first = 0, None
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if first is None and label != IGNORE_INDEX and token != IMAGE_TOKEN_INDEX:
            first = position
        position += image_tokens if token == IMAGE_TOKEN_INDEX else 1
    return position, first


def check_tokens(records: list, model_args, data_args, training_args, report: PreflightReport, *,
                 sample: Optional[int], progress: bool = False) -> None:
    """Run LLaVA's ``preprocess`` on (a sample of) the good records, as its dataset will.

    Records whose supervised tokens all lie beyond ``--model_max_length`` once the image
    is spliced in are counted as ``fully_truncated`` (not dropped: LLaVA trains on them as
    a no-op); if every checked record is, the run is refused with the length that fixes it.
    """
    image_tokens = image_token_count(model_args)
    if image_tokens is None:
        report.tokens = {"checked": 0, "note": "skipped (the vision tower's config could not be read)"}
        return
    import llava.conversation as conversation_lib
    import llava.train.train as llava_train

    good = [i for i in range(len(records)) if i not in report.bad]
    if sample is not None and len(good) > sample:
        step = len(good) / sample
        good = [good[int(k * step)] for k in range(sample)]
    tokenizer = load_tokenizer(model_args, training_args)
    template = training_template(getattr(model_args, "version", "v1"))
    mm_args = copy.copy(data_args)
    mm_args.is_multimodal = True
    mm_args.mm_use_im_start_end = getattr(model_args, "mm_use_im_start_end", False)
    limit = training_args.model_max_length
    saved = conversation_lib.default_conversation
    conversation_lib.default_conversation = template  # what train() sets; put back below
    lengths, needed, truncated = [], [], 0
    try:
        for index in _progress(good, len(good), "pre-flight: tokens", progress):
            record = records[index]
            has_image = "image" in record
            try:
                sources = [copy.deepcopy(record["conversations"])]
                if has_image:
                    sources = llava_train.preprocess_multimodal(sources, mm_args)
                data = llava_train.preprocess(sources, tokenizer, has_image=has_image)
            except Exception as error:  # noqa: BLE001 - LLaVA's own preprocess refusing is the finding
                report.add("unprocessable", index, record,
                           f"LLaVA's preprocess fails: {type(error).__name__}: {error}")
                continue
            length, first = supervised_span(data["input_ids"][0], data["labels"][0],
                                            image_tokens if has_image else 1)
            lengths.append(length)
            if first is None:
                continue  # nothing supervised at any length: LLaVA's own template choice
            needed.append(first + 1)
            if first >= limit:
                truncated += 1
                report.add("fully_truncated", index, record,
                           f"first supervised token at position {first} >= --model_max_length {limit}",
                           fatal=False)
    finally:
        conversation_lib.default_conversation = saved
    lengths.sort()
    report.tokens = {
        "checked": len(lengths), "image_tokens": image_tokens, "model_max_length": limit,
        "fully_truncated": truncated, "max_length": lengths[-1] if lengths else None,
        "median_length": lengths[len(lengths) // 2] if lengths else None,
        "length_keeping_every_record_supervised": max(needed) if needed else None,
        "note": (f"{len(lengths)} records through LLaVA's preprocess; {truncated} lose every supervised token "
                 f"at --model_max_length {limit} (image = {image_tokens} tokens)"),
    }
    if needed and truncated == len(needed):
        raise PreflightFailed(
            f"--model_max_length {limit}: every checked record ({truncated}) loses all of its supervised tokens "
            f"once its image ({image_tokens} tokens) is spliced in, so every step would be a no-op; allowed: "
            f"--model_max_length >= {min(needed)} (keeps some records supervised), >= {max(needed)} keeps all "
            f"(longest record: {lengths[-1]} tokens), or a vision tower with fewer patches")


# ---------------------------------------------------------------- the run
def resolve_mode(requested: str, plugin_active: bool) -> str:
    """``auto``: ``fast`` when a plugin is active, else ``off`` (vanilla runs stay vanilla)."""
    if requested == "auto":
        return "fast" if plugin_active else "off"
    return requested


def preflight(model_args, data_args, training_args, mode: str, *, progress: bool = True) -> PreflightReport:
    """Check ``--data_path`` in ``mode`` (``fast``/``full``); raise :class:`PreflightFailed` on fatal findings."""
    start = time.monotonic()
    data_path = data_args.data_path
    folder = getattr(data_args, "image_folder", None)
    report = PreflightReport(mode=mode, data_path=str(data_path), image_folder=folder)
    records = load_data(data_path)
    report.records = len(records)
    if not records:
        raise PreflightFailed(f"--data_path {data_path}: the file holds no records")
    if folder is None and any(isinstance(r, dict) and "image" in r for r in records):
        raise PreflightFailed(f"--image_folder: not given, but records of {data_path} have images; "
                              "allowed: the folder the 'image' paths are relative to")
    check_records(records, folder, report, style=turn_style(training_template(getattr(model_args, "version", "v1"))),
                  progress=progress)
    if mode == "full" and folder is not None:
        workers = max(1, int(getattr(training_args, "dataloader_num_workers", 0) or 0), min(8, os.cpu_count() or 1))
        decode_images(records, folder, report, workers=workers, progress=progress)
    try:
        check_tokens(records, model_args, data_args, training_args, report,
                     sample=FAST_TOKEN_SAMPLE if mode == "fast" else None, progress=progress)
    except PreflightFailed as error:
        error.report = report  # still written: the lengths are what fixes it
        raise
    finally:
        report.seconds = time.monotonic() - start
    return report


def write_json(path: str, payload) -> None:
    """Write atomically (ranks on a shared disk may write the same file); a failed write leaves nothing.

    Non-ASCII characters are written as ``\\u`` escapes, so any string ``json.load`` gave (a lone
    surrogate too) is written back as it was read."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1 if isinstance(payload, dict) else None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _outcome(model_args, data_args, training_args, mode: str, progress: bool) -> dict:
    """The pre-flight's decision as plain data (broadcast from rank 0 when distributed)."""
    report_path = os.path.join(training_args.output_dir, REPORT_DIR, "report.json")
    try:
        report = preflight(model_args, data_args, training_args, mode, progress=progress)
    except PreflightFailed as error:
        partial = getattr(error, "report", None)
        return {"error": f"{error}" + (f"; report: {report_path}" if partial else ""), "bad": [],
                "report": partial.as_dict() if partial else None, "report_path": report_path,
                "summary": partial.summary() if partial else str(error)}
    result = {"error": None, "bad": sorted(report.bad), "report": report.as_dict(),
              "summary": report.summary(), "report_path": report_path}
    good = report.records - len(report.bad)
    if report.bad and getattr(training_args, "skip_bad_records", False):
        result["report"]["dropped"] = [{"index": i, "id": report.ids[i]} for i in sorted(report.bad)]
    if report.bad:
        counts = ", ".join(f"{k} {v}" for k, v in report.counts.items() if k != "fully_truncated")
        first = report.earliest[1]
        if not getattr(training_args, "skip_bad_records", False) or good == 0:
            allowed = ("fix or remove them, or --skip_bad_records True to train on the "
                       f"{good} others") if good else "fix the records (none is usable)"
            result["error"] = (f"--data_path {data_args.data_path}: {len(report.bad)} of {report.records} records "
                               f"are unusable ({counts}; first: {first}); report: {report_path}; allowed: {allowed}")
    return result


def run_preflight(model_args, data_args, training_args, *, plugin_active: bool) -> Optional[dict]:
    """The pre-flight as ``train()`` runs it: once (rank 0), the same decision on every rank.

    Writes the report; with ``--skip_bad_records True`` points ``data_args.data_path`` at
    the good records. Raises :class:`PreflightFailed` when the run should not start.
    """
    mode = resolve_mode(getattr(training_args, "data_preflight", "auto"), plugin_active)
    if mode == "off" or model_args is None or data_args is None or not getattr(data_args, "data_path", None):
        return None
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        holder = [_outcome(model_args, data_args, training_args, mode, progress=True) if dist.get_rank() == 0
                  else None]
        dist.broadcast_object_list(holder, src=0)
        outcome, rank = holder[0], dist.get_rank()
    else:
        outcome = _outcome(model_args, data_args, training_args, mode, progress=rank == 0)
    if rank == 0 and outcome["report"] is not None:
        import sys

        print(f"[basic-llava] {outcome['summary']}", file=sys.stderr, flush=True)
        write_json(outcome["report_path"], outcome["report"])
    if outcome["error"]:
        raise PreflightFailed(outcome["error"])
    if outcome["bad"]:
        bad = set(outcome["bad"])
        good_path = os.path.join(training_args.output_dir, REPORT_DIR,
                                 "train_data.json" if distributed or rank == 0 else f"train_data.rank{rank}.json")
        if not distributed or int(os.environ.get("LOCAL_RANK", "0")) == 0:
            write_json(good_path, [r for i, r in enumerate(load_data(data_args.data_path)) if i not in bad])
        if distributed:
            dist.barrier()
        import sys

        if rank == 0:
            print(f"[basic-llava] --skip_bad_records: training on {outcome['report']['records'] - len(bad)} of "
                  f"{outcome['report']['records']} records ({len(bad)} dropped, listed in {outcome['report_path']}); "
                  f"data: {good_path}", file=sys.stderr, flush=True)
        data_args.data_path = good_path
    return outcome
