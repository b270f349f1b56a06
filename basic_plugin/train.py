"""``python -m basic_plugin.train``: LLaVA's own ``train()`` with the plugin host (default attention).

Same arguments as ``llava/train/train.py`` plus the flags of the installed plugins
(``--basic True`` for BASIC). The code is :mod:`basic_plugin.host.train`.
"""
from basic_plugin.host.train import main

if __name__ == "__main__":
    main()
