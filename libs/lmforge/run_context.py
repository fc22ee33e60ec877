"""The run being handled, for every log line, without `extra=` at each call.

The bus sets `current_run_id` around a handler (see `dispatch.run_context`);
`asyncio.to_thread` copies context variables into the worker thread, so domain
code running there logs with the run id too. The log formatter reads it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

current_run_id: ContextVar[str] = ContextVar("lmforge_run_id", default="")
"""The run id of the event being handled in this task or thread ('' outside one)."""


def _install_record_factory() -> None:
    """Stamp `run_id` on every log record made while a run is being handled.

    Done when the record is made, not when it is formatted, so a record that is
    formatted later (a queue handler, a test's capture) still has its run.
    """
    base = logging.getLogRecordFactory()
    if getattr(base, "stamps_run_id", False):
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        run_id = current_run_id.get()
        if run_id:
            record.run_id = run_id
        return record

    setattr(make_record, "stamps_run_id", True)  # noqa: B010 (a function attribute)
    logging.setLogRecordFactory(make_record)


_install_record_factory()
