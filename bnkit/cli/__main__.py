"""`python -m bnkit.cli`: the `bnkit` command."""

from bnkit.cli import main

main()
