"""`python -m altgrad` runs the command-line interface."""

from .cli import main

main()
