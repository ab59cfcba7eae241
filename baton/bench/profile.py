"""Sampling profiles of running services with py-spy, summarised as the hottest functions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


class Profiler:
    """``py-spy record`` on some pids while a scenario runs; collapsed stacks land in ``out``."""

    def __init__(self, out: Path, label: str, pids: dict[str, int], rate: int = 200) -> None:
        self.out = out
        self.label = label
        self.pids = pids
        self.rate = rate
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    @staticmethod
    def available() -> bool:
        return _py_spy() is not None

    def start(self) -> None:
        binary = _py_spy()
        if binary is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            path = self.out / f"{self.label}-{name}.collapsed"
            cmd = [binary, "record", "--pid", str(pid), "--rate", str(self.rate)]
            cmd += ["--format", "raw", "--output", str(path), "--nonblocking"]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((name, proc))

    def stop(self) -> dict[str, list[tuple[str, float]]]:
        """Stop recording (SIGINT makes py-spy write its file) and return each top list."""
        import signal

        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tops = {}
        for name, _ in self.procs:
            path = self.out / f"{self.label}-{name}.collapsed"
            if path.exists():
                tops[name] = top_functions(path.read_text())
        return tops


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def top_functions(collapsed: str, n: int = 15, inclusive: bool = False) -> list[tuple[str, float]]:
    """Share of samples per function: self time (the leaf) or, with ``inclusive``, anywhere."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, num = line.rpartition(" ")
        if not stack or not num.isdigit():
            continue
        k = int(num)
        total += k
        frames = stack.split(";")
        if inclusive:
            for frame in set(frames):
                counts[_short(frame)] += k
        else:
            counts[_short(frames[-1])] += k
    return [(f, round(100 * c / total, 1)) for f, c in counts.most_common(n)] if total else []


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" → "func (module.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({file})" if file else name
