"""The vmediad command line (click)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vmediad import logs


@click.group()
@click.version_option(package_name="vmediad")
def main() -> None:
    """vmediad: an emulated mediated video-codec device shared by many guests."""


@main.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="control socket path")
@click.option("--channels", type=int, help="hardware channels (default: CPU count)")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file")
@click.option("--policy", type=click.Choice(["fifo", "round-robin", "weighted"]))
@click.option("--metrics", help="serve Prometheus metrics on HOST:PORT")
@click.option("--log-level", default="info", show_default=True)
@click.option("--fault-injection", is_flag=True, default=None, hidden=True)
def hostd(socket_path: Path | None, channels: int | None, config_path: Path | None, policy: str | None,
          metrics: str | None, log_level: str, fault_injection: bool | None) -> None:
    """Run the host daemon in the foreground."""
    from hostd import config as hconfig
    from hostd.daemon import run_foreground
    from vmediad.errors import ConfigError

    logs.configure(log_level)
    try:
        cfg = hconfig.load(config_path or hconfig.DEFAULT_CONFIG_PATH, {
            "socket": socket_path, "channels": channels, "policy": policy, "metrics": metrics,
            "fault_injection": fault_injection,
        })
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(run_foreground(cfg))


if __name__ == "__main__":
    main()
