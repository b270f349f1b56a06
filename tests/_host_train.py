"""The plugin host's entry (``basic_plugin.train``) with the projector-init seed of ``tests/_vanilla_train.py``.

Used where a run is compared step by step with vanilla LLaVA: LLaVA's projector is
built before the Trainer seeds anything, so both sides seed the same way first.
"""
import torch

from basic_plugin.host.train import main

if __name__ == "__main__":
    torch.manual_seed(0)
    main()
