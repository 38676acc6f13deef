"""Subcommands of the ``medp2x`` command line: one module each, each with ``register(sub)``.

``cli.py`` discovers the modules here, so adding a command never edits a shared file.
"""
