"""hostd configuration: TOML file + flag overrides, validated with errors that name the key."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hostd.core.scheduler import POLICIES as SCHEDULER_POLICIES
from hostd.display import layout
from vmediad import abi
from vmediad.errors import EXIT_CONFIG, ConfigError, StartupError
from vmediad.protocol import default_socket_path

DEFAULT_CONFIG_PATH = Path("/etc/vmediad/config.toml")
POLICIES = tuple(SCHEDULER_POLICIES)
MiB = 1 << 20
# swscale's filters by PyAV's names ("point" is nearest-neighbour: allowed, never the default).
_INTERPOLATIONS = frozenset({"FAST_BILINEAR", "BILINEAR", "BICUBIC", "POINT", "AREA", "GAUSS", "LANCZOS", "SPLINE"})
__all__ = ["EXIT_CONFIG", "ConfigError", "StartupError", "default_socket_path"]  # re-exported for hostd's callers

@dataclass(frozen=True)
class Config:
    socket: Path = field(default_factory=default_socket_path)
    socket_mode: int = 0o660
    allowed_uids: tuple[int, ...] = ()  # empty: hostd's own uid (and root)
    allowed_gids: tuple[int, ...] = ()
    channels: int = 0  # 0: CPU count
    max_guests: int = 64
    metrics: str = ""  # "host:port" serves Prometheus metrics
    region_min: int = 1 * MiB
    region_max: int = 1024 * MiB
    region_default: int = 64 * MiB
    ring_min: int = 8
    ring_max: int = 4096
    ring_default: int = 256
    named_regions: bool = False  # allow the posix_ipc named-region opt-in
    max_inflight_per_guest: int = 8
    max_sessions_per_guest: int = 16
    max_width: int = 8192
    max_height: int = 8192
    max_pixels: int = 35_000_000
    policy: str = "fifo"
    weights: tuple[tuple[str, int], ...] = ()  # guest name -> weight (policy "weighted")
    spin_us: int = 50  # hostd spins this long before sleeping on futexes
    poll_only: bool = False  # never sleep on futexes: poll doorbells every poll_interval_us
    poll_interval_us: int = 200
    worker_recycle_tasks: int = 0  # 0: never recycle by count
    worker_recycle_rss_mb: int = 0  # 0: never recycle by RSS
    # Interrupt moderation (abi.BANK_IRQ_HOLDOFF): a worker raises no IRQ for a finished
    # codec task while this many more files of its channel are started; 0: one per task.
    worker_irq_holdoff: int = 2
    shutdown_grace_s: float = 5.0
    # The watchdog: a task running longer than
    #   task_timeout_s + task_timeout_per_mpx_s * megapixels * frames in the task
    # ends TIMEOUT and its worker is killed and respawned.  task_timeout_s = 0: no watchdog.
    task_timeout_s: float = 10.0
    task_timeout_per_mpx_s: float = 1.0
    metrics_grace_s: float = 300.0  # a detached guest's series stay in metrics this long
    fault_injection: bool = False  # tests only: a marker buffer makes a worker SIGSEGV
    # hostd is the ivshmem server of QEMU VMs, one socket per VM in this directory ("": off);
    # see hostd/ivshmem.py and docs/vms.md.
    ivshmem_dir: str = ""
    # The shared screen (hostd/display/): its size, the refresh it is shown at (the live page,
    # the recorder), the most compositions a second (one follows each new picture), the layout
    # at start (`vmediad display layout` words), the scaler, and the live page's address ("": no
    # page).
    display_width: int = 1280
    display_height: int = 720
    display_refresh_hz: float = 30.0
    display_max_compose_hz: float = 1000.0
    display_layout: str = "grid"
    display_interpolation: str = "bilinear"
    display_threads: int = 1
    display_http: str = ""

    def channel_count(self) -> int:
        return self.channels or (os.cpu_count() or 1)

    def weight_of(self, name: str) -> int:
        return dict(self.weights).get(name, 1)


# TOML table -> accepted keys.  A key is looked up as "table.key" in errors.
_SECTIONS: dict[str, tuple[str, ...]] = {
    "hostd": ("socket", "socket_mode", "allowed_uids", "allowed_gids", "channels", "max_guests",
              "metrics", "metrics_grace_s", "spin_us", "poll_only", "poll_interval_us", "shutdown_grace_s",
              "fault_injection", "ivshmem_dir"),
    "limits": ("region_min", "region_max", "region_default", "ring_min", "ring_max", "ring_default",
               "named_regions", "max_inflight_per_guest", "max_sessions_per_guest", "max_width",
               "max_height", "max_pixels"),
    "scheduler": ("policy", "weights"),
    "workers": ("recycle_tasks", "recycle_rss_mb", "irq_holdoff", "task_timeout_s", "task_timeout_per_mpx_s"),
    "display": ("width", "height", "refresh_hz", "max_compose_hz", "layout", "interpolation", "threads", "http"),
}
_RENAMES = {"workers.recycle_tasks": "worker_recycle_tasks", "workers.recycle_rss_mb": "worker_recycle_rss_mb",
            "workers.irq_holdoff": "worker_irq_holdoff", "workers.task_timeout_s": "task_timeout_s",
            "workers.task_timeout_per_mpx_s": "task_timeout_per_mpx_s",
            **{f"display.{k}": f"display_{k}" for k in _SECTIONS["display"]}}


def _coerce(key: str, name: str, value: Any) -> Any:
    types = {f.name: f.type for f in fields(Config)}
    kind = types[name]
    if name == "socket":
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(key, "must be a non-empty path string")
        return Path(value)
    if name == "socket_mode":
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                raise ConfigError(key, f"must be an octal mode like \"0660\", got {value!r}") from None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
            raise ConfigError(key, "must be a file mode between 0 and 0777")
        return value
    if name in ("allowed_uids", "allowed_gids"):
        if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
            raise ConfigError(key, "must be a list of non-negative integers")
        return tuple(value)
    if name == "weights":
        if not isinstance(value, dict):
            raise ConfigError(key, "must be a table of guest name = integer weight")
        for k, v in value.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1000:
                raise ConfigError(f"{key}.{k}", "weight must be an integer from 1 to 1000")
        return tuple(sorted(value.items()))
    if kind in ("bool",):
        if not isinstance(value, bool):
            raise ConfigError(key, "must be true or false")
        return value
    if kind in ("int",):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if kind in ("float",):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if kind in ("str",):
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise ConfigError(key, "unsupported")  # pragma: no cover


def display_address(value: str) -> tuple[str, str]:
    """The live page's (host, port) from ``HOST:PORT``, ``:PORT`` or ``PORT``: loopback unless a
    host is named."""
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", port


def validate(cfg: Config) -> Config:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(key, msg)

    # The socket mode is the first gate: world-writable, every local user reaches hostd and only
    # the SO_PEERCRED allow-list (checked after a connection and a thread are spent) is left.
    # A group-writable mode plus allowed_gids is the way to share hostd.
    need(not cfg.socket_mode & 0o002, "hostd.socket_mode",
         f"0{cfg.socket_mode:o} is world-writable (o+w): any local user could reach hostd; use a "
         "group mode such as 0660 and list the guests' gid in hostd.allowed_gids")
    need(0 <= cfg.channels <= 64, "hostd.channels", "must be 0 (CPU count) to 64")
    need(1 <= cfg.max_guests <= 120, "hostd.max_guests", "must be 1 to 120 (one futex_waitv call)")
    if cfg.metrics:
        host, sep, port = cfg.metrics.rpartition(":")
        need(bool(sep and host and port.isdigit() and 0 <= int(port) < 65536), "hostd.metrics",
             f"must be host:port, got {cfg.metrics!r}")
    need(not cfg.ivshmem_dir or os.path.isabs(cfg.ivshmem_dir), "hostd.ivshmem_dir",
         f"must be an absolute directory path, got {cfg.ivshmem_dir!r}")
    need(cfg.spin_us >= 0, "hostd.spin_us", "must be >= 0")
    need(cfg.poll_interval_us >= 10, "hostd.poll_interval_us", "must be >= 10")
    need(cfg.shutdown_grace_s >= 0, "hostd.shutdown_grace_s", "must be >= 0")
    need(cfg.metrics_grace_s >= 0, "hostd.metrics_grace_s", "must be >= 0")
    need(cfg.task_timeout_s >= 0, "workers.task_timeout_s", "must be >= 0 (0: no watchdog)")
    need(cfg.task_timeout_per_mpx_s >= 0, "workers.task_timeout_per_mpx_s", "must be >= 0")
    for k in ("region_min", "region_max", "region_default"):
        v = getattr(cfg, k)
        need(v > 0 and v % 4096 == 0, f"limits.{k}", "must be a positive multiple of 4096")
    need(cfg.region_min <= cfg.region_default <= cfg.region_max, "limits.region_default",
         "must lie between region_min and region_max")
    for k in ("ring_min", "ring_max", "ring_default"):
        v = getattr(cfg, k)
        need(v > 0 and v & (v - 1) == 0 and v <= 65536, f"limits.{k}", "must be a power of two <= 65536")
    need(cfg.ring_min <= cfg.ring_default <= cfg.ring_max, "limits.ring_default",
         "must lie between ring_min and ring_max")
    need(cfg.max_inflight_per_guest >= 1, "limits.max_inflight_per_guest", "must be >= 1")
    need(cfg.max_sessions_per_guest >= 1, "limits.max_sessions_per_guest", "must be >= 1")
    for k in ("max_width", "max_height", "max_pixels"):
        need(getattr(cfg, k) >= 16, f"limits.{k}", "must be >= 16")
    need(16 <= cfg.display_width <= 8192 and 16 <= cfg.display_height <= 8192, "display.width",
         f"the screen must be 16x16 to 8192x8192, got {cfg.display_width}x{cfg.display_height}")
    need(1 <= cfg.display_refresh_hz <= 240, "display.refresh_hz", "must be 1 to 240")
    need(1 <= cfg.display_max_compose_hz <= 1000, "display.max_compose_hz", "must be 1 to 1000")
    need(1 <= cfg.display_threads <= 16, "display.threads", "must be 1 to 16")
    need(cfg.display_interpolation.upper() in _INTERPOLATIONS, "display.interpolation",
         f"must be one of {', '.join(sorted(i.lower() for i in _INTERPOLATIONS))}")
    try:
        layout.validate(layout.parse(cfg.display_layout.split()), cfg.display_width, cfg.display_height)
    except layout.LayoutError as e:
        raise ConfigError("display.layout", str(e)) from None
    if cfg.display_http:
        host, port = display_address(cfg.display_http)
        need(port.isdigit() and 0 <= int(port) < 65536, "display.http",
             f"must be HOST:PORT or PORT (loopback), got {cfg.display_http!r}")
    need(cfg.policy in POLICIES, "scheduler.policy", f"must be one of {', '.join(POLICIES)}")
    need(cfg.worker_recycle_tasks >= 0, "workers.recycle_tasks", "must be >= 0")
    need(cfg.worker_recycle_rss_mb >= 0, "workers.recycle_rss_mb", "must be >= 0")
    need(0 <= cfg.worker_irq_holdoff < abi.CH_FILES, "workers.irq_holdoff",
         f"must be 0 (an IRQ per task) to {abi.CH_FILES - 1} (files per channel - 1)")
    return cfg


def from_mapping(data: dict[str, Any], base: Config | None = None) -> Config:
    changes: dict[str, Any] = {}
    for section, table in data.items():
        if section not in _SECTIONS:
            raise ConfigError(section, f"unknown section (expected one of {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a table")
        for k, v in table.items():
            key = f"{section}.{k}"
            if k not in _SECTIONS[section]:
                raise ConfigError(key, "unknown key")
            name = _RENAMES[key] if key in _RENAMES else str(k)
            changes[name] = _coerce(key, name, v)
    return validate(replace(base or Config(), **changes))


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (missing default path is fine), then apply flag overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            if path != DEFAULT_CONFIG_PATH:
                raise ConfigError("--config", f"{path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    cfg = from_mapping(data)
    if overrides:
        cfg = validate(replace(cfg, **{k: v for k, v in overrides.items() if v is not None}))
    return cfg
