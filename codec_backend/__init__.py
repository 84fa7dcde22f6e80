"""The emulated codec unit: per-guest worker processes that execute channel register files."""
