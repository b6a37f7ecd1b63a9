"""Errors raised for bad user input: one type so callers (CLI, server) can report them cleanly."""


class InputError(ValueError):
    """The caller gave input the model cannot use (bad audio, tokens, config, context...)."""
