"""``python -m siftlens.cli``: the command line."""

from . import main

main()
