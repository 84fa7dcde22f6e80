"""The top floor: the command line, the fake VMs, the soak run and the benchmarks.

These may import anything below them (hostd, codec_backend, guestlib and the foundation in
``vmediad``); nothing below imports them.
"""
