"""Vision towers that plugins offer to LLaVA through ``llava_build_vision_tower``.

- :mod:`basic_plugin.lab.towers.dinov2`: DINOv2 (``Dinov2Model`` folders), registered as the
  ``dinov2`` entry point of the ``llava`` group.
"""
