"""Shared click plumbing for the s2s CLIs: user-fixable errors become one line and exit 1."""

from __future__ import annotations

import click

from runtime.errors import S2SError


class S2SCommand(click.Command):
    """`@click.command(cls=S2SCommand)`: an S2SError prints "Error: <message>" and exits 1.

    Anything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except S2SError as err:
            raise click.ClickException(str(err)) from None
