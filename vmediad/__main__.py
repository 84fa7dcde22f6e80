"""``python -m vmediad``: the same command line as the ``vmediad`` script."""

from vmediad.cli import main

main()
