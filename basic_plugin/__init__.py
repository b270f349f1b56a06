"""basic-llava: a pluggy plugin host for LLaVA-1.5 training, with BASIC as its first plugin.

A plugin imports :mod:`basic_plugin.api`, nothing else of this package.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
