"""Vanilla LLaVA reference entry for tests: LLaVA's own ``train()``, unmodified.

Additions around it, none inside it: :func:`basic_plugin.host.cpu.apply_cpu_workarounds` (a no-op
with CUDA), without which a DeepSpeed run on CPU dies at LLaVA's final save
(``torch.cuda.synchronize``) after JIT-compiling DeepSpeed's shared-memory comm op, and
:func:`basic_plugin.host.cpu.finish_distributed` for a clean multi-rank exit.

Run as ``python -m tests._vanilla_train <train args>`` or under
``deepspeed --num_gpus N --module tests._vanilla_train <train args>``.
"""
from basic_plugin.host.cpu import apply_cpu_workarounds, finish_distributed


def main() -> None:
    import torch

    # LLaVA builds the projector before the Trainer seeds anything: seed here so that
    # runs compared step by step start from the same projector (tests/_host_train.py too).
    torch.manual_seed(0)
    apply_cpu_workarounds()
    from llava.train.train import train

    train()
    finish_distributed()


if __name__ == "__main__":
    main()
