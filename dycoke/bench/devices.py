"""The devices a benchmark runs on: datasheet figures, a measured practical peak, and what the machine is."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dycoke.metrics import Clock


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    bandwidth_bytes_per_s: float
    peak_flops_per_s: float
    source: str

    def to_dict(self) -> dict:
        return {"name": self.name, "bandwidth_TB_per_s": self.bandwidth_bytes_per_s / 1e12,
                "peak_TFLOP_per_s": self.peak_flops_per_s / 1e12, "source": self.source}


# Peak FLOP/s are dense bf16 tensor-core figures (no sparsity). Where two figures circulate, the higher one is
# used, so that the limit stays a true lower bound.
DEVICE_TABLE: dict[str, DeviceSpec] = {
    "H100": DeviceSpec("H100 SXM", 3.35e12, 989e12, "NVIDIA H100 datasheet, SXM5: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense"),
    "H100-PCIe": DeviceSpec("H100 PCIe", 2.0e12, 756e12, "NVIDIA H100 datasheet, PCIe: 2.0 TB/s HBM2e, 756 TFLOP/s bf16 dense"),
    "H200": DeviceSpec("H200 SXM", 4.8e12, 989e12, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s bf16 dense"),
    "A10G": DeviceSpec("A10G", 0.6e12, 125e12,
                       "600 GB/s GDDR6; 125 TFLOP/s is NVIDIA's bf16 dense figure for the A10 (same GA102 chip). "
                       "The A10G is also quoted near 70 TFLOP/s sustained; the higher figure keeps the bound a bound"),
    "L4": DeviceSpec("L4", 0.3e12, 121e12, "NVIDIA L4 datasheet: 300 GB/s GDDR6, 121 TFLOP/s bf16 dense (242 sparse)"),
}


def table_device(cuda_name: str) -> str | None:
    """The DEVICE_TABLE key for a CUDA device name, e.g. 'NVIDIA H100 80GB HBM3' -> 'H100'."""
    upper = cuda_name.upper()
    if "H200" in upper:
        return "H200"
    if "H100" in upper:
        return "H100-PCIe" if "PCIE" in upper else "H100"
    if "A10G" in upper:
        return "A10G"
    if re.search(r"\bL4\b", upper):
        return "L4"
    return None


def machine_name(device: torch.device) -> str:
    """What result files are named after: `cpu-2core`, `h100`, or a slug of the GPU's name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = table_device(name)
        return key.lower() if key else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return f"cpu-{cores}core"


def measure_device(device: torch.device, dtype: torch.dtype, clock: Clock) -> DeviceSpec:
    """Best-of-N copy bandwidth (bytes read + written) and square-matmul FLOP/s: a practical, measured peak."""
    elements = 32 * 1024 * 1024
    source = torch.ones(elements, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_s = _best_of(lambda: target.copy_(source), clock, 10)
    size = 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    matmul_s = _best_of(lambda: torch.matmul(a, b), clock, 5)
    bandwidth = 2 * source.nbytes / copy_s
    peak = 2 * size**3 / matmul_s
    label = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    dtype_name = str(dtype).removeprefix("torch.")
    return DeviceSpec(label, bandwidth, peak,
                      f"measured on this machine: best of 10 copies of 128 MB (read + write) and of 5 "
                      f"{size}x{size} {dtype_name} matmuls; a practical peak, not a datasheet one")


def _best_of(work: Callable[[], object], clock: Clock, times: int) -> float:
    work()
    best = math.inf
    for _ in range(times):
        start = clock.now()
        work()
        best = min(best, clock.now() - start)
    return best


def needs_measuring(device: torch.device) -> bool:
    return device.type != "cuda" or table_device(torch.cuda.get_device_name(device)) is None


def better_of(first: DeviceSpec, second: DeviceSpec) -> DeviceSpec:
    return replace(first, bandwidth_bytes_per_s=max(first.bandwidth_bytes_per_s, second.bandwidth_bytes_per_s),
                   peak_flops_per_s=max(first.peak_flops_per_s, second.peak_flops_per_s),
                   source=first.source + "; measured before and after the runs, the better of the two kept")


def device_spec_for(device: torch.device, dtype: torch.dtype, clock: Clock) -> DeviceSpec:
    if device.type == "cuda":
        key = table_device(torch.cuda.get_device_name(device))
        if key:
            return DEVICE_TABLE[key]
    return measure_device(device, dtype, clock)


def machine_info(device: torch.device, device_spec: DeviceSpec) -> dict:
    info = {
        "name": machine_name(device),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "platform": platform.platform(),
        "limits_from": device_spec.to_dict(),
        "git": _git_state(),
        "date": time.strftime("%Y-%m-%d"),
    }
    return info


def load_average() -> float | None:
    """Other work on the machine skews every timing; the report keeps the 1-minute load so that it shows."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_state() -> dict | None:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
