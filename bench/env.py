"""What machine a benchmark ran on: device name, library versions, threads, the command and the date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys

import torch


def cpu_name() -> str:
    """The CPU model string (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1") or the best available device."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device: expected an available device, got {requested!r} but CUDA is not available")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected 'cpu' or 'cuda[:N]', got {requested!r}")
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slugify(text: str) -> str:
    """A file-system-safe lower-case name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def device_slug(device: torch.device) -> str:
    name = device_name(device)
    # CPU model strings carry noise such as "(R)" and "CPU @ 2.10GHz"; keep the part that names the chip.
    if device.type == "cpu":
        name = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", " ", name, flags=re.I)
        return "cpu-" + slugify(name)
    return slugify(name)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", None)
    except Exception:  # an optional dependency that is missing or broken is simply not recorded
        return None


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): other work competing for the cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def busy_note(load: float | None, cpus: int | None, when: str) -> str | None:
    """A warning for the results when other work was running: timings on shared cores are unreliable."""
    if load is None or not cpus or load <= 0.5 * cpus:
        return None
    return (f"the machine was busy {when} (1-minute load average {load:g} on {cpus} logical cores): other "
            "processes competed for the cores, so these timings are not representative")


def environment(device: torch.device, argv: list[str] | None = None) -> dict:
    """Everything needed to interpret (and reproduce) a results file."""
    now = _dt.datetime.now(_dt.timezone.utc)
    cuda = device.type == "cuda"
    info = {
        "date": now.strftime("%Y-%m-%d"),
        "timestamp_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv)),
        "device_type": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "segmentation_models_pytorch": _version("segmentation_models_pytorch"),
        "onnxruntime": _version("onnxruntime"),
        "fusedconv": _version("fusedconv"),
        "git_commit": git_commit(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "load_average_1m_at_start": load_average(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info["gpu_sm"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_multiprocessors"] = props.multi_processor_count
    return info
