"""Failure markers the bus understands, importable without NATS.

A domain error that means "this input is bad and retrying will not help"
inherits `BadInput`; the bus turns it into one `stage.failed` event for the run,
with the error's message as the reason, and does not retry. Any other exception
is retried with backoff and dead-lettered after the last delivery.
"""

from __future__ import annotations


class BadInput(Exception):
    """Bad input: the run cannot go on and retrying will not help.

    The message should say what was wrong, with what value, and what to do.
    """
