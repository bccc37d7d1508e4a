"""Measuring whole processes (wall clock, CPU time, peak RSS) and describing the machine.

Peak RSS is the kernel's ``ru_maxrss`` of the command, from ``os.wait4`` in a small launcher
process (exact: the high-water mark of resident pages, anonymous and file-backed, e.g.
memory-mapped inputs; see ``_LAUNCHER`` for why a launcher). A sampler thread also polls
``/proc/PID/status`` every 20 ms for the split into anonymous and file-backed pages
(approximate: a peak shorter than the interval can be missed).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

POLL_S = 0.02


@dataclass(frozen=True)
class RunResult:
    cmd: list[str]
    rc: int
    wall_s: float
    cpu_s: float  # user + sys of the child
    maxrss_bytes: int  # ru_maxrss: exact peak resident set
    peak_anon_bytes: int  # polled max of RssAnon
    peak_file_bytes: int  # polled max of RssFile
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    stdout_tail: str
    stderr_tail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _drain(stream: Any, key: str, into: dict[str, bytes]) -> None:
    into[key] = stream.read() if stream is not None else b""


# The measured command runs under this small launcher: Linux carries a process's peak RSS across
# fork + exec (the forking process's high-water mark is recorded at exec), so a command forked
# from a big parent (this benchmark, after a comparison) would report at least the parent's peak.
# The launcher is a fresh, small interpreter; its child's ru_maxrss is the command's own.
_LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
rep = dict(pid=p.pid, rc=os.waitstatus_to_exitcode(status), wall_s=wall,
           cpu_s=ru.ru_utime + ru.ru_stime, maxrss_kib=ru.ru_maxrss)
with open(sys.argv[1], "w") as f:
    json.dump(rep, f)
sys.exit(0)
"""


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


class _Sampler(threading.Thread):
    """Polls the launcher's child (the measured command) for RssAnon / RssFile."""

    def __init__(self, launcher_pid: int) -> None:
        super().__init__(daemon=True)
        self.launcher_pid = launcher_pid
        self.stop = threading.Event()
        self.peak = {"RssAnon": 0, "RssFile": 0}

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in _children(self.launcher_pid):
                s = _status_kb(pid)
                for k in self.peak:
                    self.peak[k] = max(self.peak[k], s.get(k, 0))
            self.stop.wait(POLL_S)


def run_measured(
    cmd: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float | None = None
) -> RunResult:
    """Run ``cmd`` in a fresh process; wall time from spawn to exit, its own rusage."""
    import tempfile

    load_before = os.getloadavg()
    fd, report = tempfile.mkstemp(prefix="wm-bench-", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, report, *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        sampler = _Sampler(proc.pid)
        sampler.start()
        captured: dict[str, bytes] = {}
        readers = [
            threading.Thread(target=_drain, args=(stream, key, captured))
            for stream, key in ((proc.stdout, "out"), (proc.stderr, "err"))
        ]
        for r in readers:
            r.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sampler.stop.set()
        sampler.join()
        for r in readers:
            r.join()
        try:
            with open(report) as f:
                rep = json.load(f)
        except (OSError, ValueError):
            rep = {"rc": -9 if proc.returncode == 0 else proc.returncode, "wall_s": 0.0, "cpu_s": 0.0}
            rep["maxrss_kib"] = 0
    finally:
        os.unlink(report)
    out = captured.get("out", b"").decode(errors="replace")
    err = captured.get("err", b"").decode(errors="replace")
    return RunResult(
        cmd=list(cmd),
        rc=int(rep["rc"]),
        wall_s=float(rep["wall_s"]),
        cpu_s=float(rep["cpu_s"]),
        maxrss_bytes=int(rep["maxrss_kib"]) * 1024,  # Linux reports KiB
        peak_anon_bytes=sampler.peak["RssAnon"] * 1024,
        peak_file_bytes=sampler.peak["RssFile"] * 1024,
        load_before=load_before,
        load_after=os.getloadavg(),
        stdout_tail=out[-3000:],
        stderr_tail=err[-3000:],
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _git(args: list[str], cwd: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def machine_info(repo: str) -> dict[str, Any]:
    import torch

    dirty = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "mem_total_bytes": _mem_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "safetensors": _version("safetensors"),
        "mergekit": _version("mergekit"),
        "weightmerge": _version("weightmerge"),
        "commit": _git(["rev-parse", "HEAD"], repo),
        "worktree_dirty": dirty not in ("", "unknown"),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2
