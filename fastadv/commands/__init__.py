"""Subcommands of the ``fastadv`` CLI, one module each (see fastadv.cli)."""
