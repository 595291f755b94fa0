"""Typed errors for bad user input.

Bad input (a config value, a file, a field name, a checkpoint) raises a subclass of
``InputError`` (itself a ``ValueError``) whose message names the setting, file or tensor and
the problem in one line. CLIs turn it into ``error: <message>`` and exit status 2 (see
``megatron_rpt.cli.run_cli``); internal invariants use ``assert`` instead.
"""


class InputError(ValueError):
    """A problem with something the user gave us; the message is shown as is."""


class ConfigError(InputError):
    """An invalid configuration key or value; the message names the dotted key."""


class DataError(InputError):
    """A corpus, split or sample file that cannot be used; the message names the file."""


class CheckpointError(InputError):
    """A checkpoint or model directory that cannot be read or written."""
