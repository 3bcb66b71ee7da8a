"""What a process runs on: the compute device, chosen once at the edge (CUDA when present, else CPU,
same code path), its thread count, and its peak memory (for the benchmarks)."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def pick_device(prefer: str = "auto") -> torch.device:
    """`auto` takes the first visible CUDA device if any; `cpu`/`cuda` force one."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def faiss_uses_gpu(device: torch.device) -> bool:
    """FAISS follows torch's device: GPU search only when both torch and FAISS see a GPU."""
    import faiss

    return device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_threads(n: int | None = None) -> int:
    """Pin torch/FAISS intra-op threads (inside a Ray task the CPUs it was granted)."""
    import faiss

    n = n or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n


def reset_peak() -> float:
    """Current RSS (MiB), after resetting this process's peak RSS (VmHWM) to it: Linux clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: memory columns read NaN
        pass
    return _proc_status("VmRSS")


def peak_mib() -> float:
    return _proc_status("VmHWM")


def _proc_status(key: str) -> float:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    return next((int(ln.split()[1]) / 1024 for ln in lines if ln.startswith(key + ":")), float("nan"))
