"""hostd configuration: defaults, a full TOML file, errors that name the key, flag overrides, the CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest

import guestlib
from hostd import config
from hostd.config import Config, from_mapping, load
from vmediad.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "systemd" / "config.toml.example"
MiB = 1 << 20

FULL_TOML = """
[hostd]
socket = "/tmp/vmediad-test/hostd.sock"
socket_mode = "0600"
allowed_uids = [1000, 1001]
allowed_gids = [998]
channels = 3
max_guests = 10
metrics = "127.0.0.1:9464"
spin_us = 0
poll_only = true
poll_interval_us = 500
shutdown_grace_s = 2
fault_injection = true

[limits]
region_min = 65536
region_max = 268435456
region_default = 16777216
ring_min = 16
ring_max = 1024
ring_default = 64
named_regions = true
max_inflight_per_guest = 4
max_sessions_per_guest = 2
max_width = 1920
max_height = 1080
max_pixels = 2073600

[scheduler]
policy = "weighted"
weights = { vm1 = 3, vm0 = 2 }

[workers]
recycle_tasks = 1000
recycle_rss_mb = 512
irq_holdoff = 1
"""


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- defaults ------------------------------------------------------------------


def test_defaults() -> None:
    cfg = Config()
    assert from_mapping({}) == cfg
    assert load(None) == cfg
    assert config.validate(cfg) is cfg
    assert (cfg.channels, cfg.policy, cfg.metrics, cfg.socket_mode) == (0, "fifo", "", 0o660)
    assert (cfg.region_min, cfg.region_default, cfg.region_max) == (1 * MiB, 64 * MiB, 1024 * MiB)
    assert (cfg.ring_min, cfg.ring_default, cfg.ring_max) == (8, 256, 4096)
    assert cfg.max_inflight_per_guest == 8 and not cfg.named_regions and not cfg.poll_only
    assert cfg.channel_count() == (os.cpu_count() or 1)
    assert cfg.weight_of("anyone") == 1


def test_missing_default_path_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absent = tmp_path / "absent.toml"
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", absent)
    assert load(absent) == Config()


def test_missing_explicit_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load(tmp_path / "nope.toml")
    assert ei.value.key == "--config"
    assert "nope.toml" in str(ei.value)


def test_socket_default_follows_runtime_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/vmediad:/run/other")
    assert config.default_socket_path() == Path("/run/vmediad/hostd.sock")
    assert Config().socket == Path("/run/vmediad/hostd.sock")


# -- a full file ---------------------------------------------------------------


def test_full_file_parses_to_the_right_values(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, FULL_TOML))
    assert cfg == Config(
        socket=Path("/tmp/vmediad-test/hostd.sock"),
        socket_mode=0o600,
        allowed_uids=(1000, 1001),
        allowed_gids=(998,),
        channels=3,
        max_guests=10,
        metrics="127.0.0.1:9464",
        spin_us=0,
        poll_only=True,
        poll_interval_us=500,
        shutdown_grace_s=2.0,
        fault_injection=True,
        region_min=65536,
        region_max=256 * MiB,
        region_default=16 * MiB,
        ring_min=16,
        ring_max=1024,
        ring_default=64,
        named_regions=True,
        max_inflight_per_guest=4,
        max_sessions_per_guest=2,
        max_width=1920,
        max_height=1080,
        max_pixels=2073600,
        policy="weighted",
        weights=(("vm0", 2), ("vm1", 3)),
        worker_recycle_tasks=1000,
        worker_recycle_rss_mb=512,
        worker_irq_holdoff=1,
    )
    assert isinstance(cfg.shutdown_grace_s, float)
    assert cfg.channel_count() == 3
    assert cfg.weight_of("vm1") == 3 and cfg.weight_of("vm9") == 1


def test_socket_mode_accepts_an_integer() -> None:
    assert from_mapping({"hostd": {"socket_mode": 0o640}}).socket_mode == 0o640


@pytest.mark.parametrize("mode", ["0600", "0660", "0640", "0770", "0775", "0"])
def test_socket_modes_without_other_write_are_accepted(mode: str) -> None:
    assert from_mapping({"hostd": {"socket_mode": mode}}).socket_mode == int(mode, 8)


def test_world_writable_socket_mode_says_why() -> None:
    with pytest.raises(ConfigError) as ei:
        from_mapping({"hostd": {"socket_mode": "777"}})
    assert ei.value.key == "hostd.socket_mode"
    assert "0777 is world-writable" in str(ei.value) and "allowed_gids" in str(ei.value)


def test_every_config_field_is_reachable_from_a_file() -> None:
    names = {config._RENAMES.get(f"{s}.{k}", k) for s, keys in config._SECTIONS.items() for k in keys}
    assert names == {f.name for f in fields(Config)}


# -- the shipped example -------------------------------------------------------


def _uncommented_example() -> str:
    """The example with every commented-out ``# key = value`` line switched on."""
    return re.sub(r"(?m)^# ([a-z_]+ = )", r"\1", EXAMPLE.read_text())


def test_example_documents_every_key() -> None:
    text = _uncommented_example()
    tables = re.split(r"(?m)^\[([a-z]+)\]\s*$", text)
    seen = {tables[i]: set(re.findall(r"(?m)^([a-z_]+) = ", tables[i + 1])) for i in range(1, len(tables), 2)}
    assert seen == {section: set(keys) for section, keys in config._SECTIONS.items()}


def test_example_defaults_are_the_real_defaults(tmp_path: Path) -> None:
    example = EXAMPLE.read_text()
    # As shipped (everything commented out) it is the built-in defaults.
    assert load(_write(tmp_path, example, "shipped.toml")) == Config()
    # Switched on, every documented value must equal the built-in default.
    cfg = load(_write(tmp_path, _uncommented_example(), "on.toml"))
    assert cfg == replace(Config(), socket=Path("/run/vmediad/hostd.sock"))


# -- bad values name the key ---------------------------------------------------

BAD = [
    # wrong types
    ("[hostd]\nchannels = \"two\"", "hostd.channels"),
    ("[hostd]\nchannels = 2.5", "hostd.channels"),
    ("[hostd]\nmax_guests = true", "hostd.max_guests"),
    ("[hostd]\npoll_only = 1", "hostd.poll_only"),
    ("[hostd]\nshutdown_grace_s = \"5\"", "hostd.shutdown_grace_s"),
    ("[hostd]\nmetrics = 9464", "hostd.metrics"),
    ("[hostd]\nsocket = 5", "hostd.socket"),
    ("[hostd]\nsocket = \"\"", "hostd.socket"),
    ("[hostd]\nsocket_mode = \"rw-rw----\"", "hostd.socket_mode"),
    ("[hostd]\nsocket_mode = \"1777\"", "hostd.socket_mode"),
    ("[hostd]\nsocket_mode = \"777\"", "hostd.socket_mode"),  # world-writable
    ("[hostd]\nsocket_mode = \"0666\"", "hostd.socket_mode"),
    ("[hostd]\nsocket_mode = 2", "hostd.socket_mode"),
    ("[hostd]\nallowed_uids = 1000", "hostd.allowed_uids"),
    ("[hostd]\nallowed_gids = [-1]", "hostd.allowed_gids"),
    ("[limits]\nring_default = true", "limits.ring_default"),
    ("[limits]\nnamed_regions = \"yes\"", "limits.named_regions"),
    ("[scheduler]\npolicy = 3", "scheduler.policy"),
    ("[workers]\nrecycle_tasks = \"many\"", "workers.recycle_tasks"),
    # unknown keys and sections
    ("[hostd]\nchanels = 2", "hostd.chanels"),
    ("[limits]\nring = 64", "limits.ring"),
    ("[workers]\nworker_recycle_tasks = 5", "workers.worker_recycle_tasks"),
    ("[hostdd]\nchannels = 2", "hostdd"),
    ("channels = 2", "channels"),
    ("hostd = 3", "hostd"),
    # rings: powers of two, ordered
    ("[limits]\nring_default = 100", "limits.ring_default"),
    ("[limits]\nring_min = 3", "limits.ring_min"),
    ("[limits]\nring_max = 131072", "limits.ring_max"),
    ("[limits]\nring_default = 0", "limits.ring_default"),
    ("[limits]\nring_default = 8192", "limits.ring_default"),
    # regions: multiples of 4096, ordered
    ("[limits]\nregion_default = 67108865", "limits.region_default"),
    ("[limits]\nregion_min = 1000", "limits.region_min"),
    ("[limits]\nregion_max = 0", "limits.region_max"),
    ("[limits]\nregion_default = 2147483648", "limits.region_default"),
    # the shared screen
    ("[display]\nrefresh_hz = 0", "display.refresh_hz"),
    ("[display]\nmax_compose_hz = 0.5", "display.max_compose_hz"),
    ("[display]\nmax_compose_hz = 1001", "display.max_compose_hz"),
    ("[display]\nmax_compose_hz = \"fast\"", "display.max_compose_hz"),
    ("[display]\nthreads = 0", "display.threads"),
    ("[display]\ninterpolation = \"nearest\"", "display.interpolation"),
    # scheduler
    ("[scheduler]\npolicy = \"lottery\"", "scheduler.policy"),
    ("[scheduler]\npolicy = \"FIFO\"", "scheduler.policy"),
    ("[scheduler]\nweights = 3", "scheduler.weights"),
    ("[scheduler]\nweights = { vm0 = 0 }", "scheduler.weights.vm0"),
    ("[scheduler]\nweights = { vm0 = 2, vm1 = 1001 }", "scheduler.weights.vm1"),
    ("[scheduler]\nweights = { vm0 = \"2\" }", "scheduler.weights.vm0"),
    ("[scheduler]\nweights = { vm0 = true }", "scheduler.weights.vm0"),
    # metrics addresses
    ("[hostd]\nmetrics = \"localhost\"", "hostd.metrics"),
    ("[hostd]\nmetrics = \":9464\"", "hostd.metrics"),
    ("[hostd]\nmetrics = \"127.0.0.1:http\"", "hostd.metrics"),
    ("[hostd]\nmetrics = \"127.0.0.1:70000\"", "hostd.metrics"),
    ("[hostd]\nmetrics = \"127.0.0.1:-1\"", "hostd.metrics"),
    # ranges
    ("[hostd]\nchannels = 65", "hostd.channels"),
    ("[hostd]\nchannels = -1", "hostd.channels"),
    ("[hostd]\nmax_guests = 0", "hostd.max_guests"),
    ("[hostd]\nmax_guests = 121", "hostd.max_guests"),
    ("[hostd]\nspin_us = -1", "hostd.spin_us"),
    ("[hostd]\npoll_interval_us = 5", "hostd.poll_interval_us"),
    ("[hostd]\nshutdown_grace_s = -0.5", "hostd.shutdown_grace_s"),
    ("[limits]\nmax_inflight_per_guest = 0", "limits.max_inflight_per_guest"),
    ("[limits]\nmax_sessions_per_guest = 0", "limits.max_sessions_per_guest"),
    ("[limits]\nmax_width = 8", "limits.max_width"),
    ("[limits]\nmax_pixels = 15", "limits.max_pixels"),
    ("[workers]\nrecycle_tasks = -1", "workers.recycle_tasks"),
    ("[workers]\nrecycle_rss_mb = -1", "workers.recycle_rss_mb"),
    ("[workers]\nirq_holdoff = 4", "workers.irq_holdoff"),
    ("[workers]\nirq_holdoff = -1", "workers.irq_holdoff"),
    ("[workers]\ntask_timeout_s = -1", "workers.task_timeout_s"),
    ("[workers]\ntask_timeout_per_mpx_s = -0.1", "workers.task_timeout_per_mpx_s"),
    ("[hostd]\nmetrics_grace_s = -1", "hostd.metrics_grace_s"),
    # not TOML at all
    ("[hostd\nchannels = 2", "--config"),
]


@pytest.mark.parametrize(("text", "key"), BAD, ids=[f"{k}:{i}" for i, (_, k) in enumerate(BAD)])
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load(_write(tmp_path, text + "\n"))
    assert ei.value.key == key
    assert f"'{key}'" in str(ei.value)  # the exact key, quoted, so "limits.ring" cannot match "limits.ring_min"


def test_watchdog_keys_load_and_zero_turns_it_off(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, "[workers]\ntask_timeout_s = 0\ntask_timeout_per_mpx_s = 2.5\n"
                                "[hostd]\nmetrics_grace_s = 0\n"))
    assert (cfg.task_timeout_s, cfg.task_timeout_per_mpx_s, cfg.metrics_grace_s) == (0.0, 2.5, 0.0)


def test_config_error_is_a_vmediad_error() -> None:
    from vmediad.errors import VmediadError

    assert issubclass(ConfigError, VmediadError)


# -- flag overrides --------------------------------------------------------------


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL_TOML)
    cfg = load(path, {"socket": tmp_path / "flag.sock", "channels": 5, "policy": "round-robin",
                      "metrics": None, "fault_injection": None})
    assert cfg.socket == tmp_path / "flag.sock"
    assert cfg.channels == 5
    assert cfg.policy == "round-robin"
    # None means "flag not given": the file's value stays, and so does everything else.
    assert cfg.metrics == "127.0.0.1:9464"
    assert cfg.fault_injection is True
    assert cfg == replace(load(path), socket=tmp_path / "flag.sock", channels=5, policy="round-robin")


def test_overrides_are_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL_TOML)
    with pytest.raises(ConfigError) as ei:
        load(path, {"channels": 65})
    assert ei.value.key == "hostd.channels"
    with pytest.raises(ConfigError) as ei:
        load(path, {"metrics": "nohost"})
    assert ei.value.key == "hostd.metrics"


# -- the command line ------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmediad", "hostd", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


CLI_BAD = [
    ("[limits]\nring_default = 100\n", "limits.ring_default"),
    ("[scheduler]\nweights = { vm0 = 0 }\n", "scheduler.weights.vm0"),
    ("[hostd]\nmetrics = \"nohost\"\n", "hostd.metrics"),
    ("[bogus]\nx = 1\n", "bogus"),
    ("[hostd]\nsocket_mode = \"777\"\n", "hostd.socket_mode"),
]


@pytest.mark.parametrize(("text", "key"), CLI_BAD, ids=[k for _, k in CLI_BAD])
def test_cli_refuses_a_bad_config(tmp_path: Path, text: str, key: str) -> None:
    bad = _write(tmp_path, text, "bad.toml")
    sock = tmp_path / "h.sock"
    t0 = time.monotonic()
    r = subprocess.run(_cli("--socket", str(sock), "--config", str(bad)), env=_env(), capture_output=True,
                       text=True, timeout=30)
    elapsed = time.monotonic() - t0
    assert r.returncode == 78, r.stderr  # EX_CONFIG: the unit does not restart
    assert "Traceback" not in r.stderr
    assert f"'{key}'" in r.stderr
    assert elapsed < 10
    assert not sock.exists()  # it never started serving


def test_cli_refuses_a_missing_config(tmp_path: Path) -> None:
    r = subprocess.run(_cli("--socket", str(tmp_path / "h.sock"), "--config", str(tmp_path / "none.toml")),
                       env=_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "--config" in r.stderr and "none.toml" in r.stderr


def test_cli_bad_flag_override_names_the_key(tmp_path: Path) -> None:
    good = _write(tmp_path, "[hostd]\nchannels = 2\n", "good.toml")
    r = subprocess.run(_cli("--socket", str(tmp_path / "h.sock"), "--config", str(good), "--channels", "65"),
                       env=_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "'hostd.channels'" in r.stderr


def test_cli_flags_win_over_the_file_in_a_running_hostd(tmp_path: Path) -> None:
    file_sock = tmp_path / "file.sock"
    flag_sock = tmp_path / "flag.sock"
    cfg = _write(tmp_path, f'[hostd]\nsocket = "{file_sock}"\nchannels = 1\n\n[scheduler]\npolicy = "round-robin"\n')
    with open(tmp_path / "hostd.log", "wb") as logf:
        p = subprocess.Popen(_cli("--config", str(cfg), "--socket", str(flag_sock), "--channels", "2"),
                             env=_env(), stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not flag_sock.exists():
            assert p.poll() is None, (tmp_path / "hostd.log").read_text()
            assert time.monotonic() < deadline, "hostd did not create its socket"
            time.sleep(0.02)
        status = guestlib.hostd_status(str(flag_sock))
        assert len(status["channels"]) == 2  # the flag, not the file's 1
        assert status["policy"] == "round-robin"  # the file, no flag given
        assert not file_sock.exists()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
