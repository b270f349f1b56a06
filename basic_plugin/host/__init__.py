"""The plugin host: LLaVA's training with hooks (hookspecs, manager, seams, forward, trainer, flags, data checks).

Generic: it knows nothing of BASIC. Imports point down only: ``lab`` -> ``basic`` -> ``api`` -> ``host``;
a plugin imports :mod:`basic_plugin.api`, nothing of this package directly.

State is passed in where a run owns it (the parse record and the refusal mode of one
installation's argument classes, a run's objectives in its trainer). What stays at module
level records a change to something process-wide, and each has its undo or reset
(``tests/test_layout.py`` keeps this list complete):

- ``plugins.pm``, ``plugins._loaded``, ``plugins._undo_trace``: the process's plugin manager,
  whether it has loaded, its trace monitor (:func:`basic_plugin.host.plugins.reset_plugins`);
- ``integration._originals``: what the seams replaced in LLaVA's modules
  (:func:`basic_plugin.host.integration.remove_plugin_host`);
- ``cpu._undo_stack``: the CPU workarounds' patches (:func:`basic_plugin.host.cpu.remove_cpu_workarounds`);
- ``binding._bindings``: model -> its run's objectives, a weak map (gone with the model);
- ``forward._cache``: one plugin-forward class per LLaVA model class (classes never change).
"""
