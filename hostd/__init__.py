"""hostd: the vmediad host daemon (control plane, scheduler, register files, workers)."""
