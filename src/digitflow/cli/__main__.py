"""`python -m digitflow.cli`: the `digitflow` command."""

from digitflow.cli.main import app

app(prog_name="digitflow")
