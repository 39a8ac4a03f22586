"""P1's noise-free companion: user-space instructions per delivery, counted by callgrind.

Throughput and CPU time on a shared machine move by tens of percent between
runs; an instruction count does not (valgrind counts instructions, not time).
Each app is served by uvicorn under ``valgrind --tool=callgrind``, warmed up,
its counters zeroed, then loaded by wrk; the dump's total divided by the
requests wrk completed is the figure. Kernel time (system calls) is not
counted, so this is the work the Python process does, not all it costs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench import measure
from bench.procs import Processes
from tests.polling import eventually_sync

VALGRIND = ("valgrind", "--tool=callgrind", "--dump-instr=no")


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def instructions_per_request(
    procs: Processes, name: str, app: str, deliveries: Path, seconds: int
) -> float:
    out_dir = procs.work_dir / f"callgrind-{name}"
    out_dir.mkdir(exist_ok=True)
    wrapper = (*VALGRIND, f"--callgrind-out-file={out_dir}/callgrind.out.%p")
    server, url = procs.start_app(f"{name}-callgrind", app, wrapper=wrapper)
    try:
        measure.run_wrk(url, deliveries, 3, connections=64)  # imports, caches, pools
        _control("-z", server.pid)  # zero the counters: count only the measured load
        result = measure.run_wrk(url, deliveries, seconds, connections=64)
        _control("-d", server.pid)
        return _dumped_total(out_dir, server.pid) / result.requests
    finally:
        procs.stop(server, timeout_s=60)


def _control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def _dumped_total(out_dir: Path, pid: int) -> int:
    """The dump's total, once callgrind has written it (callgrind_control returns before)."""

    def total() -> int | None:
        for dump in sorted(out_dir.glob(f"callgrind.out.{pid}.*")):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        return None

    what = f"a callgrind dump with totals for pid {pid} in {out_dir}"
    found = eventually_sync(total, what, timeout_s=30, interval_s=0.2)
    assert found is not None  # eventually_sync returns only a truthy value
    return found
