"""LLaVA's dataset and collator, with a record that fails to load named instead of a traceback.

The pre-flight's ``fast`` mode checks that every image file is there, not that it decodes. A
corrupt image it let through would end the run at the step that reaches it, in a traceback
from inside LLaVA's dataset (70 lines through a DataLoader worker) that names no record. Here
the record whose image does not decode is, at load time:

- without ``--skip_bad_records``: one line naming the record and the file
  (:class:`RecordUnusable`, a refusal: ``error: ...``, exit status 2);
- with ``--skip_bad_records True``: skipped, one line saying so, the next usable record trained in
  its place, and counted (``data_skipped_records`` in the logs; the collator carries the count).

Any other failure of a record is LLaVA's own, raised as it was.
"""
from __future__ import annotations

import os
import sys

from basic_plugin.host.records import record_label
from basic_plugin.host.refusal import Refusal

#: the batch key carrying how many records were skipped to fill it (taken out before the model sees it)
SKIPPED_KEY = "skipped_records"


class RecordUnusable(Refusal):
    """A record that cannot be loaded at training time; the message names it and its file."""

    def __init__(self, message: str = ""):
        # a DataLoader worker's exception is raised again in the main process as
        # type(error)("Caught ... in DataLoader worker process N.\nOriginal Traceback ...\n...RecordUnusable: <message>")
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def image_problem(record, image_folder) -> tuple[str, str] | None:
    """``(path, why)`` when ``record``'s image does not decode as LLaVA reads it, else None."""
    from basic_plugin.host.preflight import _decode

    if not isinstance(record, dict) or not isinstance(record.get("image"), str) or image_folder is None:
        return None
    path = os.path.join(image_folder, record["image"])
    problem = _decode(path)
    return None if problem is None else (path, problem)


def hosted_data_module(original):
    """LLaVA's ``make_supervised_data_module`` whose dataset and collator are those below (same objects,
    their class swapped for the subclass: LLaVA's own ``__init__`` names its class in ``super()``, so the
    name cannot be rebound)."""

    def make_supervised_data_module(tokenizer, data_args):
        module = original(tokenizer=tokenizer, data_args=data_args)
        dataset, collator = module.get("train_dataset"), module.get("data_collator")
        if dataset is not None:
            dataset.__class__ = guarded_dataset_class(type(dataset))
        if collator is not None:
            collator.__class__ = counting_collator_class(type(collator))
        return module

    make_supervised_data_module._llava_plugin_original = original
    return make_supervised_data_module


def guarded_dataset_class(dataset_cls: type) -> type:
    """``dataset_cls`` (LLaVA's ``LazySupervisedDataset``) whose ``__getitem__`` names a record whose image
    does not decode, or skips it (``skip_bad_records``, set by the host's trainer from the flag)."""

    def __getitem__(self, i):
        skipped, index = 0, i
        for _ in range(len(self)):
            try:
                item = dataset_cls.__getitem__(self, index)
            except Exception:
                record = self.list_data_dict[index]
                found = image_problem(record, getattr(self.data_args, "image_folder", None))
                if found is None:
                    raise  # not an image that fails to decode: LLaVA's own error
                message = f"{record_label(record, index)}: image {found[0]} does not decode ({found[1]})"
                if not self.skip_bad_records:
                    raise RecordUnusable(f"{message}; allowed: fix or remove the record, or --skip_bad_records True "
                                         "to skip such records as they come (counted as data_skipped_records)") \
                        from None
                skipped += 1
                index = (index + 1) % len(self)
                print(f"[basic-llava] {message}: skipped (--skip_bad_records True), record {index} trained in its "
                      "place", file=sys.stderr, flush=True)
                continue
            if skipped:
                item[SKIPPED_KEY] = skipped
            return item
        raise RecordUnusable(f"--data_path: no record of {len(self)} could be loaded; allowed: fix the records")

    return type(dataset_cls.__name__, (dataset_cls,), {
        "__module__": __name__, "__qualname__": dataset_cls.__name__, "__getitem__": __getitem__,
        "skip_bad_records": False,
        "__doc__": f"{dataset_cls.__name__} naming (or skipping) a record whose image does not decode.",
    })


def counting_collator_class(collator_cls: type) -> type:
    """``collator_cls`` (LLaVA's ``DataCollatorForSupervisedDataset``) that adds :data:`SKIPPED_KEY` to a batch
    for which records were skipped (and only then)."""

    def __call__(self, instances):
        batch = collator_cls.__call__(self, instances)
        skipped = sum(int(instance.get(SKIPPED_KEY, 0)) for instance in instances)
        if skipped:
            batch[SKIPPED_KEY] = skipped
        return batch

    return type(collator_cls.__name__, (collator_cls,), {
        "__module__": __name__, "__qualname__": collator_cls.__name__, "__call__": __call__,
        "__doc__": f"{collator_cls.__name__} carrying the count of records skipped at load time.",
    })
