"""`python -m kvfuse.cli ...` is the `kvfuse` command."""

from kvfuse.cli.main import run

run()
