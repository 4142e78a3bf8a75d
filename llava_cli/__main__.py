"""`python -m llava_cli` runs the `llava` command."""

from .cli import main

main()
