"""basic-llava: a pluggy plugin host for LLaVA-1.5 training, with BASIC as its first plugin."""
from basic_plugin.host.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
