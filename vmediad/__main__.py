"""``python -m vmediad``: the same command line as the ``vmediad`` script."""

from vmediad.tools.cli import main

main()
