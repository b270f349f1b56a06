"""What the numbers were measured on, and what it has left: recorded with every report,
since CPU timings move with the machine and its load, and used to skip runs that would
not fit in memory."""
from __future__ import annotations

import os
import platform
from typing import Dict, List, Optional

import torch

__all__ = ["GB", "MB", "available_bytes", "machine_info", "loadavg", "sync"]

GB = 1e9
MB = 1e6


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall times cover it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device) -> Dict[str, object]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads(), "device": str(device)}
    try:
        info["cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cpus"] = os.cpu_count()
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = cpu
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            info["ram_total_gb"] = round(int(f.readline().split()[1]) * 1024 / GB, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / GB, 1)
    return info
