"""``python -m tests._cpu_eval llava.eval.<entry> <its arguments>``: one of LLaVA's eval entries, unchanged, on a CPU.

LLaVA's eval entries move their inputs with ``.to(device='cuda')``; here ``cuda`` means the CPU, and nothing
else changes. basic-llava is kept out of the process (``sys.modules['basic_plugin'] = None``): evaluating a
BASIC checkpoint needs LLaVA alone.
"""
import runpy
import sys

import torch

_to = torch.Tensor.to


def _on_cpu(device):
    return "cpu" if isinstance(device, (str, torch.device)) and str(device).startswith("cuda") else device


def _to_cpu(self, *args, **kwargs):
    if "device" in kwargs:
        kwargs["device"] = _on_cpu(kwargs["device"])
    return _to(self, *(_on_cpu(a) for a in args), **kwargs)


if __name__ == "__main__":
    sys.modules["basic_plugin"] = None  # `import basic_plugin` fails in this process
    torch.Tensor.to = _to_cpu
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
