"""The plugin host: LLaVA's training with hooks (hookspecs, manager, seams, forward, trainer, flags, data checks).

Generic: it knows nothing of BASIC. Imports point down only: ``lab`` -> ``basic`` -> ``host``.
"""
