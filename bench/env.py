"""What machine a benchmark ran on: device name, library versions, threads, the command and the date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time

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


def busy_note(load: float | None, cpus: int | None, when: str, *, what: str = "1-minute load average") -> str | None:
    """A warning for the results when other work was running: timings on shared cores are unreliable. `load` is
    a number of busy cores that the benchmark itself did not cause (see OtherCPUUse for the run itself)."""
    if load is None or not cpus or load <= 0.5 * cpus:
        return None
    return (f"the machine was busy {when} ({what} {load:g} on {cpus} logical cores): other "
            "processes competed for the cores, so these timings are not representative")


def _machine_busy_seconds() -> float | None:
    """CPU seconds all cores together spent running anything since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        # cpu  user nice system idle iowait irq softirq steal ...: busy = user + nice + system + irq + softirq
        # (steal is time the hypervisor gave to other machines, not work on this one).
        if fields[0] != "cpu" or len(fields) < 8:
            return None
        ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7))
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _descendants_cpu_seconds(root: int) -> float:
    """CPU seconds of the live processes below `root` (Inductor's compile workers and the compilers they run:
    not waited for by this process, so getrusage does not count them), with the children they reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, used = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        # After "pid (comm)": state ppid ... utime(12th) stime cutime cstime.
        parent[int(name)] = int(rest[1])
        used[int(name)] = sum(int(v) for v in rest[11:15]) / tick
    total, frontier = 0.0, [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid:
                total += used[child]
                frontier.append(child)
    return total


def _own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads), the children it waited for and its live descendants used."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        below = _descendants_cpu_seconds(os.getpid())
    except OSError:
        below = 0.0
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + below


class OtherCPUUse:
    """How many cores other processes kept busy while the benchmark ran, on average.

    The load average cannot say this at the end of a run: the benchmark's own threads are in it (a 2-thread run
    on 2 cores reads as "busy" on an idle machine). Here the machine's busy CPU time over the run (/proc/stat)
    minus the CPU time of this process and the processes it started, divided by the elapsed time, is what
    everything else used.
    `cores()` is None where the OS has no /proc/stat."""

    def __init__(self):
        self.start = (time.monotonic(), _machine_busy_seconds(), _own_cpu_seconds())

    def cores(self) -> float | None:
        t0, busy0, own0 = self.start
        busy1 = _machine_busy_seconds()
        elapsed = time.monotonic() - t0
        if busy0 is None or busy1 is None or elapsed <= 0:
            return None
        others = (busy1 - busy0) - (_own_cpu_seconds() - own0)
        return round(max(others, 0.0) / elapsed, 2)


def busy_at_start(cpus: int | None, load_average_1m: float | None, window_s: float = 1.0
                  ) -> tuple[float | None, str | None]:
    """(cores other processes kept busy, note or None) over `window_s` seconds before the run starts.

    Not the 1-minute load average: it still holds whatever ran in the minute before (a previous benchmark that
    just finished reads as "busy" on an idle machine). The load average is the fallback where the OS has no
    /proc/stat."""
    probe = OtherCPUUse()
    time.sleep(window_s)
    cores = probe.cores()
    if cores is None:
        return None, busy_note(load_average_1m, cpus, "at the start")
    return cores, busy_note(cores, cpus, "at the start",
                            what=f"cores kept busy by other processes over the {window_s:g} s before the run,")


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
        "cudnn_allow_tf32": _cudnn_conv_allows_tf32() if cuda else None,
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


def _cudnn_conv_allows_tf32() -> bool:
    # Imported when asked: importing fusedconv.kernels imports triton, which must see TRITON_INTERPRET first.
    from fusedconv.kernels.precision import cudnn_conv_allows_tf32

    return cudnn_conv_allows_tf32()


def set_threads(threads: int | None) -> None:
    """A CPU benchmark's `--threads`: torch's intra-op thread count, when given (a positive integer)."""
    if threads is None:
        return
    if threads < 1:
        raise SystemExit(f"--threads: expected a positive integer, got {threads}")
    torch.set_num_threads(threads)


def write_rows(path: str, module: str, argv: list[str] | None, rows: list, **extra) -> dict:
    """Write a CPU benchmark's rows to `path` as JSON with the environment (the command: `python -m module` and
    `argv`, the process's own arguments when None); returns the environment."""
    import json

    command = ["python", "-m", module, *(sys.argv[1:] if argv is None else argv)]
    environment_ = environment(torch.device("cpu"), command)
    if path:
        with open(path, "w") as f:
            json.dump({"environment": environment_, "rows": rows, **extra}, f, indent=1)
    return environment_
