"""The control-plane protocol: JSON lines over a Unix socket (pure, no I/O).

Requests are one JSON object per line with a ``cmd``:

* ``attach``: ``name``, ``region_size``, ``ring_entries``, ``named`` (posix_ipc
  opt-in), ``adopt`` (the region fd travels with the request, SCM_RIGHTS).
  Reply: ``vm``, ``epoch``, ``caps``, ``layout``, ``shm_name``; the region fd
  travels with the reply.  Adopting the region of a guest that was killed is refused
  (kind ``killed``): the guest must attach afresh.
* ``detach``: ends the connection's guest.  Socket EOF means the same.
* ``status``: reply ``status`` is hostd's ``statistics()`` snapshot.
* ``ping``: reply ``version`` and ``abi``.
* ``list``: reply ``vms``, one object per attached guest (``vm``, ``name``, ``pid``, ``uid``,
  ``state``, ``tasks_done``, ``tasks_failed``, ``sessions``, ...).
* ``kill``: ``vm`` (a guest's id as digits or an integer, else its name) is detached and
  everything it held reclaimed; its control connection is closed, its region marked GONE
  (REG_DEVICE_STATE) and never re-adopted.  Only root or hostd's own uid may kill (kind
  ``permission``); an unknown guest is kind ``not_found``, a name several guests share is
  kind ``ambiguous``.  Reply ``vm``, ``name``, ``reclaimed``.
* ``events``: reply ``events`` (the names hostd publishes); from then on the connection carries
  one JSON line per event, QMP-style ``{"event", "data", "timestamp": {"seconds",
  "microseconds"}}``, until the client closes it.  A client too slow to read loses the oldest
  events and is told with an ``events_dropped`` event (``data.dropped``: the total so far).

* ``vm_socket``: ``name`` (a QEMU VM's): hostd listens for that VM's QEMU on an ivshmem-server
  socket; reply ``name``, ``path``, ``region_size`` (only root or hostd's own uid; kind
  ``unsupported`` without --ivshmem-dir).
* ``display_list``: reply ``display``: the shared screen's snapshot (size, refresh, layout, and
  per VM its state, viewport, commit rate, presented, dropped, latency).
* ``display_layout``: ``words`` (``vmediad display layout`` words: ``grid``, ``main [VM]``,
  ``rects VM=X,Y,W,H[,Z] ...``, ``aspect=``, ``hide=``); reply ``display`` after the change.
  A layout that is malformed or does not fit is kind ``layout``.
* ``display_snapshot``: ``after`` (a screen seq, default 0) and ``wait_s`` (at most 5): the first
  composed screen with a seq above ``after``, waiting up to ``wait_s``; reply ``seq``, ``width``,
  ``height``, ``format`` ("bgra"), ``size``, and a sealed memfd with the pixels (rows of
  width * 4 bytes) travels with the reply (SCM_RIGHTS).  Kind ``timeout`` if none came.

Replies carry ``ok``; a refusal is ``{"ok": false, "error": text, "kind": ...}``.
The control plane is never used per task.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmediad import abi
from vmediad.errors import ProtocolError

MAX_LINE = 64 * 1024
COMMANDS = ("attach", "detach", "status", "ping", "list", "kill", "events", "vm_socket", "display_list",
            "display_layout", "display_snapshot")
VM_REF_MAX = 64
LAYOUT_WORDS_MAX = 64
SNAPSHOT_WAIT_MAX_S = 5.0


@dataclass(frozen=True)
class Request:
    cmd: str
    name: str = ""
    region_size: int | None = None
    ring_entries: int | None = None
    named: bool = False
    adopt: bool = False
    vm: str = ""  # kill: a guest's name or id
    words: tuple[str, ...] = ()  # display_layout
    after: int = 0  # display_snapshot
    wait_s: float = 0.0  # display_snapshot


def parse_request(line: bytes) -> Request:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("request must be a JSON object")
    cmd = obj.get("cmd")
    if cmd not in COMMANDS:
        raise ProtocolError(f"unknown cmd {cmd!r}; expected one of {', '.join(COMMANDS)}")
    name = obj.get("name", "")
    if not isinstance(name, str) or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ProtocolError("name must be up to 64 characters of [A-Za-z0-9._-]")
    ints: dict[str, int | None] = {}
    for key in ("region_size", "ring_entries"):
        v = obj.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ProtocolError(f"{key} must be a positive integer")
        ints[key] = v
    flags: dict[str, bool] = {}
    for key in ("named", "adopt"):
        v = obj.get(key, False)
        if not isinstance(v, bool):
            raise ProtocolError(f"{key} must be true or false")
        flags[key] = v
    vm = obj.get("vm", "")
    if isinstance(vm, int) and not isinstance(vm, bool) and vm > 0:
        vm = str(vm)
    if not isinstance(vm, str) or len(vm) > VM_REF_MAX or not all(c.isalnum() or c in "-_." for c in vm):
        raise ProtocolError("vm must be a guest name or a positive id")
    if cmd == "kill" and not vm:
        raise ProtocolError("kill needs vm (a guest name or id)")
    if cmd == "vm_socket" and not name:
        raise ProtocolError("vm_socket needs a name")
    words = obj.get("words", [])
    if not isinstance(words, list) or len(words) > LAYOUT_WORDS_MAX \
            or not all(isinstance(w, str) and len(w) <= 256 for w in words):
        raise ProtocolError(f"words must be a list of at most {LAYOUT_WORDS_MAX} strings")
    if cmd == "display_layout" and not words:
        raise ProtocolError("display_layout needs words (grid, main [VM] or rects VM=X,Y,W,H ...)")
    after = obj.get("after", 0)
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise ProtocolError("after must be a non-negative integer")
    wait_s = obj.get("wait_s", 0)
    if not isinstance(wait_s, int | float) or isinstance(wait_s, bool) or not 0 <= wait_s <= SNAPSHOT_WAIT_MAX_S:
        raise ProtocolError(f"wait_s must be a number from 0 to {SNAPSHOT_WAIT_MAX_S:g}")
    return Request(cmd, name, ints["region_size"], ints["ring_entries"], flags["named"], flags["adopt"], vm,
                   tuple(words), after, float(wait_s))


@dataclass(frozen=True)
class AttachLimits:
    region_min: int
    region_max: int
    region_default: int
    ring_min: int
    ring_max: int
    ring_default: int
    named_regions: bool


def resolve_attach(req: Request, lim: AttachLimits) -> tuple[int, int]:
    """The region size and ring entries hostd will grant, or ProtocolError saying why not."""
    size = req.region_size if req.region_size is not None else lim.region_default
    ring = req.ring_entries if req.ring_entries is not None else lim.ring_default
    if size % abi.PAGE_SIZE:
        raise ProtocolError(f"region_size must be a multiple of {abi.PAGE_SIZE}", "limit")
    if not lim.region_min <= size <= lim.region_max:
        raise ProtocolError(f"region_size {size} outside [{lim.region_min}, {lim.region_max}]", "limit")
    if ring & (ring - 1) or not lim.ring_min <= ring <= lim.ring_max:
        raise ProtocolError(f"ring_entries {ring} must be a power of two in [{lim.ring_min}, {lim.ring_max}]",
                            "limit")
    if req.named and not lim.named_regions:
        raise ProtocolError("named regions are disabled (limits.named_regions = false)", "limit")
    try:
        abi.compute_layout(size, ring)
    except abi.LayoutError as e:
        raise ProtocolError(str(e), "limit") from None
    return size, ring


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def ok(**fields: Any) -> bytes:
    return encode({"ok": True, **fields})


def refuse(message: str, kind: str = "bad_request") -> bytes:
    return encode({"ok": False, "error": message, "kind": kind})


def default_socket_path() -> Path:
    """Where hostd listens unless told otherwise, and where guests look for it.

    $RUNTIME_DIRECTORY (systemd), else /run/vmediad, else $XDG_RUNTIME_DIR/vmediad.  The one
    place of the protocol that looks at the environment and the file system."""
    rt = os.environ.get("RUNTIME_DIRECTORY")
    if rt:
        return Path(rt.split(":")[0]) / "hostd.sock"
    run = Path("/run/vmediad")
    if run.is_dir() and os.access(run, os.W_OK):
        return run / "hostd.sock"
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return run / "hostd.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vmediad-{os.getuid()}"
    return Path(xdg) / "vmediad" / "hostd.sock"
