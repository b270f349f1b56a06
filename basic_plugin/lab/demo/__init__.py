"""The CPU demo: a real mini-LLaVA (DINOv2-small + SmolLM2-135M) trained without BASIC and with it
(at the setting the validation grid chose; optionally also at the paper's defaults).

* :mod:`basic_plugin.lab.demo.data`: ``basic-llava data``, LLaVA-format datasets from packaged images
  (Fashion-MNIST from Debian's ``dataset-fashion-mnist``, a few packaged photos).
* :mod:`basic_plugin.lab.demo.run`: ``basic-llava demo``, assets -> data -> stage-1 projector
  pretraining (baseline and the BASIC arms, same seed) -> evaluation -> report (verdict first).
* :mod:`basic_plugin.lab.demo.selected`: the setting the grid chose and what it found.
* :mod:`basic_plugin.lab.demo.evaluate`: loading a trained projector, zero-shot scoring with a
  shared image prefix, statistics (Wilson interval, McNemar), greedy captions.
* :mod:`basic_plugin.lab.demo.report`: plots, terminal table, Markdown/HTML report.
* :mod:`basic_plugin.lab.lens`: ``basic-llava lens``, the per-layer nearest-word analysis.
"""
