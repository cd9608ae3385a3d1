"""Machine load for the dashboard: CPU, memory, disk (psutil) and GPUs (nvidia-ml-py, when
importable; null otherwise, never an error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil


def gpus() -> list[dict[str, Any]] | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver / no GPU: same as not installed
        return None
    out = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            try:
                temperature = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            except Exception:  # noqa: BLE001 - not every board reports it
                temperature = None
            out.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "utilization": util.gpu,
                "memory_used": memory.used,
                "memory_total": memory.total,
                "temperature": temperature,
            })
    except Exception:  # noqa: BLE001 - a query failing mid-way reports what it had
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return out


def system_info(folders: list[Path]) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    disks = []
    for folder in folders:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            usage = psutil.disk_usage(str(probe))
            disks.append({"path": str(folder), "free": usage.free, "total": usage.total})
        except OSError:
            continue
    return {
        "cpu": {"percent": psutil.cpu_percent(interval=None), "count": psutil.cpu_count()},
        "memory": {"used": memory.total - memory.available, "total": memory.total, "percent": memory.percent},
        "disks": disks,
        "gpus": gpus(),
    }
