"""Fake-VM workloads inside real QEMU VMs (``vmediad vm spawn --kind qemu``).

Each VM boots with the host's root file system (docs/vms.md) and runs
``python -m vmediad.tools.qemufleet SPEC.json``: the same ``run_vm`` as a fake VM process,
reporting on the console (one ``REPORT_MARK`` line per report) instead of a pipe.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vmediad.tools.fakevm import FINAL_STATES, STOP_SIGNALS, VmReport, VmSpec, _planned, codec_label, run_vm

REPORT_MARK = "vmediad-report "  # a console line carrying one VmReport as JSON


class _ConsoleConn:
    """run_vm's progress pipe inside a VM: one console line per report (QEMU's stdout)."""

    def send(self, obj: dict[str, Any]) -> None:
        print(REPORT_MARK + json.dumps(obj), flush=True)

    def close(self) -> None:
        pass


def vm_socket(control_socket: str, name: str) -> str:
    """Ask hostd to serve VM ``name`` over ivshmem; the path of its socket.  AttachError (kind
    "unsupported" when hostd runs without --ivshmem-dir), DeviceGone when hostd is unreachable."""
    from guestlib.device import _request

    return str(_request(control_socket, {"cmd": "vm_socket", "name": name}, 5.0)["path"])


class QemuFleet:
    """Like Fleet, with each VM a QEMU guest (vmediad.tools.vmimage/qemu) running run_vm inside,
    attached to hostd through its ivshmem socket.  Each VM's share (its run script, spec and
    working files) is ``<output>/.vm-<name>``, mounted at the same path in the guest; the VM's
    output file is moved into ``<output>`` when it ends."""

    def __init__(self, specs: list[VmSpec], control_socket: str, image: Any, accel: Any) -> None:
        self.specs = specs
        self.control_socket = control_socket
        self.image = image
        self.accel = accel
        self.reports: dict[str, VmReport] = {s.name: VmReport(s.name, s.workload, codec_label(s), total=_planned(s))
                                             for s in specs}
        self.guests: dict[str, Any] = {}
        self.shares: dict[str, Path] = {}
        self._seen: dict[str, int] = {}
        self._ended: set[str] = set()
        self.stopping = False

    def start(self) -> None:
        from vmediad import ivshmem
        from vmediad.tools import vmimage
        from vmediad.tools.qemu import Guest, write_run_script

        for spec in self.specs:
            out = Path(spec.output).resolve()
            share = out / f".vm-{spec.name}"
            share.mkdir(parents=True, exist_ok=True)
            self.shares[spec.name] = share
            path = vm_socket(self.control_socket, spec.name)
            inner = VmSpec(**{**asdict(spec), "socket": "", "output": str(share),
                              "input": str(Path(spec.input).resolve()) if spec.input else None})
            (share / "spec.json").write_text(json.dumps(asdict(inner)))
            write_run_script(share, [sys.executable, "-m", "vmediad.tools.qemufleet", str(share / "spec.json")],
                             cwd=share, env={"VMEDIAD_TRANSPORT": "ivshmem"})
            argv = vmimage.qemu_command(self.image, share, accel=self.accel, ivshmem_socket=Path(path),
                                        vectors=ivshmem.VECTORS)
            self.guests[spec.name] = Guest(argv).start()
            self._seen[spec.name] = 0

    def poll(self, timeout: float) -> list[VmReport]:
        time.sleep(timeout)
        changed: list[VmReport] = []
        for spec in self.specs:
            name = spec.name
            g = self.guests.get(name)
            if g is None or name in self._ended:
                continue
            lines = g.lines[self._seen[name]:]
            self._seen[name] += len(lines)
            for ln in lines:
                if ln.text.startswith(REPORT_MARK):
                    try:
                        r = VmReport(**json.loads(ln.text[len(REPORT_MARK):]))
                    except (ValueError, TypeError):
                        continue
                    self.reports[name] = r
                    changed.append(r)
            code = g.poll()
            if code is not None and len(g.lines) == self._seen[name]:
                self._ended.add(name)
                r = self.reports[name]
                self._collect(spec, r)
                if r.state not in FINAL_STATES:
                    if self.stopping:
                        r.state = "stopped"
                    else:
                        r.state = "failed"
                        r.errors += 1
                        tail = [ln.text for ln in g.lines[-5:]]
                        r.detail = f"QEMU exited {code} (script status {g.exit_status}): " + " | ".join(tail)
                changed.append(r)
        return changed

    def _collect(self, spec: VmSpec, r: VmReport) -> None:
        """Move the VM's output from its share into the output folder."""
        if r.output:
            src = Path(r.output)
            dst = Path(spec.output).resolve() / src.name
            if src.is_file():
                src.replace(dst)
                r.output = str(dst)

    def signal_all(self, sig: int) -> None:
        """Any stop ends the VMs: QEMU's clean exit (SIGTERM), or SIGKILL."""
        self.stopping = True
        for g in self.guests.values():
            g.signal(signal.SIGKILL if sig == signal.SIGKILL else signal.SIGTERM)

    def close(self, timeout: float = 5.0) -> None:
        for g in self.guests.values():
            g.close()
        for spec in self.specs:
            if spec.name not in self._ended:
                self._collect(spec, self.reports[spec.name])
            share = self.shares.get(spec.name)
            if share is not None:
                shutil.rmtree(share, ignore_errors=True)

    def finished(self) -> bool:
        return len(self._ended) == len(self.specs)

    def results(self) -> list[VmReport]:
        return [self.reports[s.name] for s in self.specs]


def _main_in_vm(spec_path: str) -> None:
    """Entry point inside a QEMU guest: run one VmSpec, reporting on the console."""
    spec = VmSpec(**json.loads(Path(spec_path).read_text()))
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    run_vm(spec, _ConsoleConn(), os.getppid())  # type: ignore[arg-type]


if __name__ == "__main__":
    _main_in_vm(sys.argv[1])
