"""The `altgrad` command line: parse arguments, call the library, render with rich."""

from .app import app, main

__all__ = ["app", "main"]
