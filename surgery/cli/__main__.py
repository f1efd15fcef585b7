"""`python -m surgery.cli`: the same as the `moe-surgery` command."""

from surgery.cli import main

main()
