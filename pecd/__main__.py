"""``python -m pecd``: the command line (the supervisor starts its workers this way)."""

from pecd.cli import main

main()
