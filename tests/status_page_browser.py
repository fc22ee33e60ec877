"""`lmforge ui` in a real headless browser: Debian's chromium, driven through playwright.

Playwright only drives it (`executable_path`); no browser is downloaded. The page is
served by the real command (`lmforge ui --port 0`, the address read from its first
line). Every console message of level error and every uncaught page exception is
kept, so a test can assert there were none. When chromium is missing the test fails
with the line that installs it: the browser test is part of the suite, not skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MISSING = ("chromium is not installed: `apt-get install -y chromium` (as root, `make test` "
           "does it)")

READ_RUN_ROW = """(runId) => {
  const row = document.querySelector(`#runs tr[data-run-id="${runId}"]`);
  return row === null ? null : {...row.dataset};
}"""
"""The data-* attributes of a run's row, as the page's script last rendered it."""


class StatusPageCommand:
    """`lmforge ui --port 0` as a child process, until `stop()`."""

    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.log_file = log_file
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli.main", "ui", "--port", "0"], env=env,
            stdout=subprocess.PIPE, stderr=log_file.open("wb"), text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline()  # "lmforge status page at http://... (...)"
        if " at http://" not in first:
            self.stop()
            raise AssertionError(f"lmforge ui did not start: {first!r}\n"
                                 f"{log_file.read_text()}")
        self.url = first.split(" at ", 1)[1].split()[0]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class StatusPageBrowser:
    """One page of headless chromium on `url`; a context manager."""

    def __init__(self, url: str) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            raise RuntimeError(MISSING)
        self.binary = binary
        self.url = url
        self.errors: list[str] = []
        """Console errors and uncaught exceptions, as 'console: ...' / 'page: ...'."""

    def __enter__(self) -> StatusPageBrowser:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=self.binary)
        self.page = self._browser.new_page(viewport={"width": 1400, "height": 1100})
        self.page.on("console", lambda message: self.errors.append(
            f"console: {message.text}") if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(f"page: {error}"))
        self.page.goto(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self._browser.close()
        self._playwright.stop()

    def run_row(self, run_id: str) -> dict[str, Any] | None:
        """The run's row as now shown (stage, status, step, total-steps), or None."""
        return self.page.evaluate(READ_RUN_ROW, run_id)

    def watch_run(self, run_id: str, *, until_done: subprocess.Popen[Any], timeout_s: float,
                  on_change: Callable[[dict[str, Any]], None] = lambda row: None,
                  every_s: float = 0.2) -> list[dict[str, Any]]:
        """Every distinct state of the run's row while `until_done` runs (and once after),
        without reloading the page: only its own polling can change what is read.
        `on_change` sees each new state as it is read (to take a screenshot then)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            finished = until_done.poll() is not None
            row = self.run_row(run_id)
            if row is not None and (not seen or row != seen[-1]):
                seen.append(row)
                on_change(row)
            if finished:
                break
            time.sleep(every_s)
        return seen

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path
