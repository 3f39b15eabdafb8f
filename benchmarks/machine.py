"""Machine description stored with every benchmark's JSON."""

from __future__ import annotations

import datetime as _dt
import os
import platform

import torch


def machine_info(device: str = "cpu") -> dict:
    """Date, versions, CPU (and GPU when device == 'cuda') of this run."""
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "cpu_name": platform.processor() or "unknown",
    }
    try:
        import zerocomm

        info["zerocomm_version"] = zerocomm.__version__
        info["zerocomm_build"] = dict(zerocomm.build_info())
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_name"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["device_name"] = props.name
        info["cuda_version"] = torch.version.cuda
        info["gpu_memory_gib"] = round(props.total_memory / 1024**3, 1)
        info["sm_count"] = props.multi_processor_count
    else:
        info["device_name"] = info["cpu_name"]
    return info
