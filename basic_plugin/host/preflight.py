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

import contextlib
import copy
import gc
import io
import json
import math
import os
import re
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
#: (LLaVA's preprocess raised), ``no_supervised_tokens`` (LLaVA's preprocess masks every label:
#: a tokenization mismatch, or no answer text), ``fully_truncated`` (no supervised token left
#: within ``--model_max_length``)
ALL_KINDS = (*PROBLEM_KINDS, "undecodable", "unprocessable", "no_supervised_tokens", "fully_truncated")
#: what LLaVA's ``preprocess_v1`` / ``_mpt`` / ``_llama_2`` print before masking a whole record
MISMATCH = re.compile(r"WARNING: tokenization mismatch: (\d+) vs\. (\d+)")


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
    images: int = 0  # records with an image
    shares: list = field(default_factory=list)  # what each rank checked (several ranks)
    items: list = field(default_factory=list)  # every finding, (index, kind, message, fatal, id), for merging

    def add(self, kind: str, index: int, record, detail: str, *, fatal: bool = True) -> None:
        record_id = record.get("id") if isinstance(record, dict) else None
        self.add_item((index, kind, f"{record_label(record, index)}: {detail}", fatal, record_id))

    def add_item(self, item: tuple) -> None:
        index, kind, message, fatal, record_id = item
        self.items.append(item)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if fatal:
            self.bad.add(index)
            self.ids[index] = record_id
            if self.earliest is None or index < self.earliest[0]:
                self.earliest = (index, message)
        examples = self.first.setdefault(kind, [])
        if len(examples) < FIRST_N:
            examples.append(message)

    def as_dict(self) -> dict:
        result = {"mode": self.mode, "data_path": self.data_path, "image_folder": self.image_folder,
                  "records": self.records, "records_with_image": self.images, "unusable_records": len(self.bad),
                  "counts": self.counts, "first": self.first, "tokens": self.tokens,
                  "seconds": round(self.seconds, 3)}
        if self.shares:
            result["ranks"] = self.shares
        return result

    def summary(self) -> str:
        head = (f"data pre-flight ({self.mode}) of {self.data_path}: {self.records} records, "
                f"{len(self.bad)} unusable")
        if len(self.shares) > 1:
            head += f" (checked by {len(self.shares)} ranks, {self.seconds:.1f} s)"
        lines = [head]
        for kind in ALL_KINDS:
            if kind in self.counts:
                lines.append(f"  {kind}: {self.counts[kind]}")
                lines += [f"    {example}" for example in self.first.get(kind, [])]
        if self.tokens:
            lines.append(f"  token check: {self.tokens.get('note', '')}".rstrip())
        return "\n".join(lines)


#: items of one stage each rank checks between two of its all-reduces (:class:`Share`): record rules,
#: image decodes (``full``), records through LLaVA's preprocess
ROUND = {"records": 20000, "images": 256, "tokens": 256}


class Share:
    """This process's part of the pre-flight, and the collectives that keep the ranks together.

    On several ranks the records are dealt out by index (rank r checks records r, r + W, ...) and
    each stage runs in rounds (:data:`ROUND`): after every round each rank takes part in one tiny
    all-reduce, so no rank ever waits for another longer than one round of its work, however big
    the file (a rank waiting in one collective for the whole check would hit the process group's
    timeout). At the end every rank gathers every rank's findings and reaches the same decision.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @classmethod
    def of_process(cls) -> "Share":
        """The ranks of the initialised process group, or this process alone."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def mine(self, count: int) -> range:
        return range(self.rank, count, self.world)

    def _device(self):
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def most(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def rounds(self, items: list, stage: str):
        """``items`` in rounds of ``ROUND[stage]``; every rank goes through the same number of rounds."""
        size = ROUND[stage]
        for start in range(0, self.most(len(items)), size):
            yield items[start:start + size]
            self.most(0)  # the rounds' all-reduce: every rank is still at work

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered


#: files smaller than this are checked without a progress bar
PROGRESS_FROM = 5000


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled or total < PROGRESS_FROM:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="rec", mininterval=1.0, leave=False)


def _in_rounds(items: list, share: Share, stage: str, desc: str, progress: bool):
    """Each item of ``items``, in :meth:`Share.rounds`, with a progress bar on rank 0."""
    bar = _progress(None, len(items) * share.world, desc, progress and share.rank == 0) if progress else None
    for chunk in share.rounds(items, stage):
        yield from chunk
        if bar is not None:
            bar.update(len(chunk) * share.world)
    if bar is not None:
        bar.close()


@contextlib.contextmanager
def gc_paused():
    """Python's cycle collector off for the block: reading 665K records makes millions of objects, and a
    collection every few thousand of them (none of which can be freed) took half the time of ``json.load``."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_data(data_path: str) -> list:
    """The records of a LLaVA JSON file (read as LLaVA reads it, with ``json.load``), or
    :class:`PreflightFailed` naming the file."""
    try:
        with open(data_path, encoding="utf-8") as f, gc_paused():
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
                  share: Share = None, progress: bool = False) -> None:
    """The record rules, for every record of this rank's share (``fast`` and ``full``), as LLaVA's
    template ``style`` reads them."""
    share = share or Share()
    folder = normalised_folder(image_folder)
    for index in _in_rounds(list(share.mine(len(records))), share, "records", "pre-flight: records", progress):
        record = records[index]
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
                  share: Share = None, progress: bool = False) -> int:
    """``full`` mode: decode every image of this rank's records not already found bad, in ``workers``
    processes; returns how many were decoded."""
    share = share or Share()
    folder = normalised_folder(image_folder)
    todo = [(i, os.path.join(folder, records[i]["image"])) for i in share.mine(len(records))
            if i not in report.bad and isinstance(records[i], dict) and "image" in records[i]]
    pool = None
    if workers > 1 and len(todo) > 64:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
    bar = _progress(None, len(todo) * share.world, "pre-flight: images", progress and share.rank == 0)
    try:
        for chunk in share.rounds(todo, "images"):
            paths = [path for _, path in chunk]
            results = pool.map(_decode, paths, chunksize=16) if pool is not None else [_decode(p) for p in paths]
            for (index, path), error in zip(chunk, results):
                if error is not None:
                    report.add("undecodable", index, records[index], f"image {path} does not decode ({error})")
            if bar is not None:
                bar.update(len(chunk) * share.world)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    return len(todo)


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


def preprocessed(record, tokenizer, mm_args, llava_train) -> tuple[dict, str]:
    """LLaVA's ``preprocess`` of one record as its dataset runs it, and what it printed (its mismatch warning)."""
    has_image = "image" in record
    sources = [copy.deepcopy(record["conversations"])]
    if has_image:
        sources = llava_train.preprocess_multimodal(sources, mm_args)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        data = llava_train.preprocess(sources, tokenizer, has_image=has_image)
    return data, printed.getvalue()


def untruncated_first(record, tokenizer, mm_args, llava_train) -> Optional[int]:
    """Position of a text-only record's first supervised token when its turns are not cut (LLaVA's preprocess
    cuts text-only records at ``model_max_length`` before it masks the turns)."""
    from transformers.utils import logging as hf_logging

    limit, verbosity = tokenizer.model_max_length, hf_logging.get_verbosity()
    tokenizer.model_max_length = 1 << 30
    hf_logging.set_verbosity_error()  # the tokenizer's "longer than the maximum" notice: the point here
    try:
        data, _ = preprocessed(record, tokenizer, mm_args, llava_train)
    finally:
        tokenizer.model_max_length = limit
        hf_logging.set_verbosity(verbosity)
    return supervised_span(data["input_ids"][0], data["labels"][0], 1)[1]


def check_tokens(records: list, model_args, data_args, training_args, report: PreflightReport, *,
                 sample: Optional[int], share: Share = None, progress: bool = False) -> None:
    """Run LLaVA's ``preprocess`` on (a sample of) the good records of this rank's share, as its dataset will.

    A record whose labels LLaVA's preprocess masks entirely is ``no_supervised_tokens``
    (unusable): a tokenization mismatch between the ``--version`` template and the tokenizer
    (LLaVA prints ``WARNING: tokenization mismatch`` and trains on it as a no-op), or no
    answer text; if every checked record has a mismatch, the run is refused with
    ``--version`` as the fix. Records whose supervised tokens all lie beyond
    ``--model_max_length`` (once the image is spliced in; a text-only record's turns cut by
    the tokenizer) are counted as ``fully_truncated`` (not dropped: LLaVA trains on them as
    a no-op); if every checked record is, the run is refused with the length that fixes it.
    (:func:`token_summary`, once every rank's counts are in). ``sample``: records in all, evenly
    spaced over each rank's good records.
    """
    share = share or Share()
    image_tokens = image_token_count(model_args)
    if image_tokens is None:
        report.tokens = {"checked": 0, "note": "skipped (the vision tower's config could not be read)"}
        return
    import llava.conversation as conversation_lib
    import llava.train.train as llava_train

    good = [i for i in share.mine(len(records)) if i not in report.bad]
    quota = None if sample is None else -(-sample // share.world)
    if quota is not None and len(good) > quota:
        step = len(good) / quota
        good = [good[int(k * step)] for k in range(quota)]
    tokenizer = load_tokenizer(model_args, training_args)
    version = getattr(model_args, "version", "v1")
    template = training_template(version)
    mm_args = copy.copy(data_args)
    mm_args.is_multimodal = True
    mm_args.mm_use_im_start_end = getattr(model_args, "mm_use_im_start_end", False)
    limit = training_args.model_max_length
    saved = conversation_lib.default_conversation
    conversation_lib.default_conversation = template  # what train() sets; put back below
    separator = template.sep2 or template.sep
    lengths, needed, truncated, mismatched = [], [], 0, 0
    try:
        for index in _in_rounds(good, share, "tokens", "pre-flight: tokens", progress):
            record = records[index]
            has_image = "image" in record
            try:
                data, printed = preprocessed(record, tokenizer, mm_args, llava_train)
            except Exception as error:  # noqa: BLE001 - LLaVA's own preprocess refusing is the finding
                report.add("unprocessable", index, record,
                           f"LLaVA's preprocess fails: {type(error).__name__}: {error}")
                continue
            length, first = supervised_span(data["input_ids"][0], data["labels"][0],
                                            image_tokens if has_image else 1)
            lengths.append(length)
            mismatch = MISMATCH.search(printed)
            if first is None and not has_image and not mismatch and len(data["input_ids"][0]) >= limit:
                first = untruncated_first(record, tokenizer, mm_args, llava_train)  # its answer was cut off
            if first is None:
                mismatched += bool(mismatch)
                cause = (f"LLaVA's preprocess masks every label ('tokenization mismatch: {mismatch[1]} vs. "
                         f"{mismatch[2]}'): the --version {version} template does not tokenize like this "
                         f"tokenizer, or the text holds its separator {separator!r}" if mismatch else
                         "LLaVA's preprocess leaves no token to learn from (no answer text)")
                report.add("no_supervised_tokens", index, record, cause)
                continue
            needed.append(first + 1)
            if first >= limit:
                truncated += 1
                report.add("fully_truncated", index, record,
                           f"first supervised token at position {first} >= --model_max_length {limit} "
                           f"(--model_max_length >= {first + 1} keeps it)", fatal=False)
    finally:
        conversation_lib.default_conversation = saved
    report.tokens = {"lengths": lengths, "needed": needed, "fully_truncated": truncated, "mismatched": mismatched,
                     "version": version, "image_tokens": image_tokens, "model_max_length": limit}


def token_summary(report: PreflightReport) -> None:
    """The token counts of :func:`check_tokens` (every rank's, merged) as reported; raises
    :class:`PreflightFailed` when every checked record loses all of its supervised tokens."""
    if "lengths" not in report.tokens:
        return
    stats = report.tokens
    lengths, needed, truncated = sorted(stats["lengths"]), stats["needed"], stats["fully_truncated"]
    limit, image_tokens = stats["model_max_length"], stats["image_tokens"]
    mismatched, version = stats["mismatched"], stats["version"]
    report.tokens = {
        "checked": len(lengths), "image_tokens": image_tokens, "model_max_length": limit,
        "fully_truncated": truncated, "no_supervised_tokens": report.counts.get("no_supervised_tokens", 0),
        "max_length": lengths[-1] if lengths else None,
        "median_length": lengths[len(lengths) // 2] if lengths else None,
        "length_keeping_every_record_supervised": max(needed) if needed else None,
        "note": (f"{len(lengths)} records through LLaVA's preprocess; {truncated} lose every supervised token "
                 f"at --model_max_length {limit} (image = {image_tokens} tokens)"),
    }
    if mismatched and mismatched == len(lengths):
        raise PreflightFailed(
            f"--version {version}: LLaVA's preprocess finds a tokenization mismatch in every checked record "
            f"({mismatched}) and masks all of their labels, so every step would be a no-op; allowed: the template "
            "the LLM was trained with (v1 for Vicuna-v1.5 instruction tuning, plain for projector pretraining) "
            "and the tokenizer LLaVA-1.5 expects (tokenizers 0.15.x with transformers 4.37; `basic-llava doctor`)")
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


def preflight(model_args, data_args, training_args, mode: str, *, progress: bool = True,
              share: Share = None) -> PreflightReport:
    """Check ``--data_path`` in ``mode`` (``fast``/``full``); raise :class:`PreflightFailed` on fatal findings.

    ``share``: this rank's part (:class:`Share`; default: this process checks everything). Every rank
    returns (or raises) the same, from every rank's findings.
    """
    share = share or Share()
    start = time.monotonic()
    data_path = data_args.data_path
    folder = getattr(data_args, "image_folder", None)
    report = PreflightReport(mode=mode, data_path=str(data_path), image_folder=folder)
    records = load_data(data_path)
    report.records = len(records)
    if not records:
        raise PreflightFailed(f"--data_path {data_path}: the file holds no records")
    report.images = sum(1 for r in records if isinstance(r, dict) and "image" in r)
    if folder is None and report.images:
        raise PreflightFailed(f"--image_folder: not given, but records of {data_path} have images; "
                              "allowed: the folder the 'image' paths are relative to")
    with gc_paused():
        check_records(records, folder, report, share=share, progress=progress,
                      style=turn_style(training_template(getattr(model_args, "version", "v1"))))
        decoded = 0
        if mode == "full" and folder is not None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # ranks sharing this machine's cores
            workers = max(1, int(getattr(training_args, "dataloader_num_workers", 0) or 0),
                          min(8, (os.cpu_count() or 1) // max(1, local)))
            decoded = decode_images(records, folder, report, workers=workers, share=share, progress=progress)
        check_tokens(records, model_args, data_args, training_args, report, share=share,
                     sample=FAST_TOKEN_SAMPLE if mode == "fast" else None, progress=progress)
    if share.world > 1:
        report = merged(report, share.gather(_part(report, share, decoded, time.monotonic() - start)))
    try:
        token_summary(report)
    except PreflightFailed as error:
        error.report = report  # still written: the lengths are what fixes it
        raise
    finally:
        report.seconds = time.monotonic() - start
    return report


def _part(report: PreflightReport, share: Share, decoded: int, seconds: float) -> dict:
    """What one rank found, for :func:`merged`."""
    return {"items": report.items, "tokens": report.tokens,
            "share": {"rank": share.rank, "records": len(share.mine(report.records)), "images_decoded": decoded,
                      "tokens_checked": len(report.tokens.get("lengths", ())), "seconds": round(seconds, 3)}}


def merged(mine: PreflightReport, parts: list) -> PreflightReport:
    """One report from every rank's part, the same on every rank (findings in record order)."""
    report = PreflightReport(mode=mine.mode, data_path=mine.data_path, image_folder=mine.image_folder,
                             records=mine.records, images=mine.images)
    for item in sorted((tuple(item) for part in parts for item in part["items"]), key=lambda it: (it[0], it[1])):
        report.add_item(item)
    tokens = [part["tokens"] for part in parts if "lengths" in part["tokens"]]
    if tokens:
        report.tokens = {**tokens[0], "lengths": [n for t in tokens for n in t["lengths"]],
                         "needed": [n for t in tokens for n in t["needed"]],
                         "fully_truncated": sum(t["fully_truncated"] for t in tokens),
                         "mismatched": sum(t["mismatched"] for t in tokens)}
    else:
        report.tokens = parts[0]["tokens"]
    report.shares = [part["share"] for part in parts]
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


def _outcome(model_args, data_args, training_args, mode: str, progress: bool, share: Share = None) -> dict:
    """The pre-flight's decision as plain data (the same on every rank)."""
    report_path = os.path.join(training_args.output_dir, REPORT_DIR, "report.json")
    try:
        report = preflight(model_args, data_args, training_args, mode, progress=progress, share=share)
    except PreflightFailed as error:
        partial = getattr(error, "report", None)
        return {"error": f"{error}" + (f"; report: {report_path}" if partial else ""), "bad": [],
                "report": partial.as_dict() if partial else None, "report_path": report_path,
                "summary": partial.summary() if partial else str(error)}
    result = {"error": None, "bad": sorted(report.bad), "report": report.as_dict(),
              "summary": report.summary(), "report_path": report_path, "images": report.images}
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
    """The pre-flight as ``train()`` runs it: shared by the ranks (:class:`Share`), the same decision on each.

    Writes the report; with ``--skip_bad_records True`` points ``data_args.data_path`` at
    the good records. Raises :class:`PreflightFailed` when the run should not start. With a
    plugin on and no record with an image, says so (the plugins' terms would never apply).
    """
    mode = resolve_mode(getattr(training_args, "data_preflight", "auto"), plugin_active)
    if mode == "off" or model_args is None or data_args is None or not getattr(data_args, "data_path", None):
        return None
    import sys

    import torch.distributed as dist

    share = Share.of_process()
    distributed = share.world > 1
    rank = share.rank if distributed else int(os.environ.get("RANK", "0"))
    outcome = _outcome(model_args, data_args, training_args, mode, progress=rank == 0, share=share)
    if rank == 0 and outcome["report"] is not None:
        print(f"[basic-llava] {outcome['summary']}", file=sys.stderr, flush=True)
        write_json(outcome["report_path"], outcome["report"])
    if outcome["error"]:
        raise PreflightFailed(outcome["error"])
    if plugin_active and not outcome["images"] and rank == 0:
        print(f"[basic-llava] no record of --data_path {data_args.data_path} has an image: a plugin's terms on "
              "image rows will apply at no step, and the run trains like the baseline", file=sys.stderr,
              flush=True)
    if outcome["bad"]:
        bad = set(outcome["bad"])
        good_path = os.path.join(training_args.output_dir, REPORT_DIR,
                                 "train_data.json" if distributed or rank == 0 else f"train_data.rank{rank}.json")
        if not distributed or int(os.environ.get("LOCAL_RANK", "0")) == 0:
            write_json(good_path, [r for i, r in enumerate(load_data(data_args.data_path)) if i not in bad])
        if distributed:
            dist.barrier()
        if rank == 0:
            print(f"[basic-llava] --skip_bad_records: training on {outcome['report']['records'] - len(bad)} of "
                  f"{outcome['report']['records']} records ({len(bad)} dropped, listed in {outcome['report_path']}); "
                  f"data: {good_path}", file=sys.stderr, flush=True)
        data_args.data_path = good_path
    return outcome
