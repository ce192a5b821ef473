"""`lightspeed serve` with its log kept, for tests that assert what the server logged."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration.conftest import Server, start_serve, stop_serve

# A line logged at ERROR (the cli's format: "<date> <time> ERROR <pid> <logger>: ...") or any
# traceback, from the frontend, a worker or aiohttp.
_ERROR_LINE = re.compile(r"^\S+ \S+ (?:ERROR|CRITICAL) |^Traceback ", re.MULTILINE)


@dataclass
class LoggedServer:
    server: Server
    log: Path
    _read: int = 0  # bytes of the log already looked at

    def new_error_lines(self) -> list[str]:
        """Error lines logged since the previous call: each test sees only its own."""
        with self.log.open("rb") as f:
            f.seek(self._read)
            text = f.read()
        end = text.rfind(b"\n") + 1  # a line still being written is read next time
        self._read += end
        lines = text[:end].decode(errors="replace").splitlines()
        return [line for line in lines if _ERROR_LINE.match(line)]


@contextmanager
def logged_serve(args: list[str], workers: int) -> Iterator[LoggedServer]:
    """Start the server with its stderr (where every process logs) in a file; stop it after."""
    with tempfile.TemporaryDirectory(prefix="lightspeed-log-") as folder:
        path = Path(folder) / "serve.log"
        with path.open("wb") as log:
            saved = os.dup(2)
            os.dup2(log.fileno(), 2)  # inherited by the child, which start_serve does not redirect
            try:
                server = start_serve(args, workers)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        try:
            yield LoggedServer(server, path)
        finally:
            assert stop_serve(server) == 0
