"""Start the KME processes of the tests (`python -m gunicorn ...`, `python -m flask ...`) by fork from a launcher
that has already imported the libraries they use.

Each start of a KME process used to spend about 0.7 s of CPU importing
SQLAlchemy, Flask, numpy, requests, gunicorn and the rest, and the suite
starts hundreds of them on two cores. The launcher, one per pytest process,
imports those libraries once; each process the tests ask for is forked from
it and then runs the module as `python -m` would: the same gunicorn or flask
entry point, arguments, environment, working folder, stdio and exit status.
Nothing of the KME itself is imported before the fork (kme.interfaces.startup
must choose the metrics mode before prometheus_client is imported, and the
code under test loads as in production). Processes are still stopped by
their own pid; the launcher reaps them and reports how each ended.

Run as `python -m tests.launcher` by Launcher; it speaks JSON lines on its
stdin and stdout.
"""
import io
import json
import os
import runpy
import selectors
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What KME processes import besides the KME and prometheus_client; one missing here only costs its import.
_LIBRARIES = (
    "apispec", "click", "concurrent.futures", "cryptography.hazmat.primitives.ciphers.aead",
    "cryptography.hazmat.primitives.serialization.pkcs12", "cryptography.x509", "flask", "flask_sqlalchemy",
    "gunicorn.app.wsgiapp", "gunicorn.arbiter", "gunicorn.glogging", "gunicorn.workers.gthread", "json5",
    "marshmallow", "multiprocessing", "numpy", "pkcs11", "psycopg", "requests",
    "sqlalchemy.dialects.postgresql.psycopg", "sqlalchemy.dialects.sqlite", "sqlalchemy.orm", "sqlite3", "ssl",
    "uuid", "watchdog.events", "watchdog.observers",
)


# --- the launcher process -------------------------------------------------------------------------------------

def _serve() -> dict:
    """Fork a child for each request read on stdin and report its pid, then how it ended; return only in a child,
    with the request it is to carry out (an empty one when stdin closes).

    Stdin closes when the test process closes the launcher, or dies (a crash,
    a kill): what the launcher started and still runs then is killed by its
    pid, so that no KME of a run outlives it (the tests stop theirs before).
    """
    reports = os.fdopen(os.dup(1), "w", buffering=1)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "request")
    selector.register(wake_read, selectors.EVENT_READ, "child")
    pending = b""
    running: set[int] = set()
    while True:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(wake_read, 4096)
                _report_ended(reports, running)
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                _end(running)
                return {}
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_read)
                    os.close(wake_write)
                    reports.close()
                    return request
                running.add(pid)
                reports.write(json.dumps({"started": pid}) + "\n")


def _report_ended(reports, running: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        running.discard(pid)
        reports.write(json.dumps({"ended": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n")


def _end(running: set[int]) -> None:
    """SIGKILL the processes this launcher started that still run, by pid, and reap them (a gunicorn master's
    workers end on their own once they see their master gone)."""
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for pid in running:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            continue


def _become(request: dict) -> None:
    """In the forked child: take the request's folder, environment and stdio, then run its module as __main__."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if request["stderr"] else out
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True,
                                  errors="backslashreplace")
    sys.argv = ["-m", *request["arguments"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


def main() -> None:
    for name in _LIBRARIES:
        __import__(name)
    request = _serve()
    if request:
        _become(request)


# --- the tests' side ------------------------------------------------------------------------------------------

class Launched:
    """A process started by the launcher, used as a subprocess.Popen is: pid, poll, wait, send_signal."""

    def __init__(self, launcher: "Launcher", args: list[str], pid: int):
        self.args, self.pid, self.returncode = args, pid, None
        self._launcher = launcher

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._launcher.returncode(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._launcher.returncode(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """The launcher process of this pytest process, and what it reported."""

    def __init__(self):
        self._process = subprocess.Popen([sys.executable, "-m", "tests.launcher"], cwd=ROOT, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._started: list[int] = []
        self._ended: dict[int, int] = {}
        self._gone = False
        threading.Thread(target=self._read, daemon=True, name="launcher-reports").start()

    def _read(self) -> None:
        for line in self._process.stdout:
            report = json.loads(line)
            with self._changed:
                if "started" in report:
                    self._started.append(report["started"])
                else:
                    self._ended[report["ended"]] = report["returncode"]
                self._changed.notify_all()
        with self._changed:
            self._gone = True
            self._changed.notify_all()

    def start(self, args: list[str], env: dict, cwd: Path, stdout: Path, stderr: Path | None) -> Launched:
        """Start ``args`` ([python, "-m", module, ...]) with this environment, folder and output files (stderr
        None: into stdout)."""
        python, flag, module, *arguments = args
        if python != sys.executable or flag != "-m":
            raise ValueError(f"only `{sys.executable} -m module` can be launched: {args}")
        request = {"module": module, "arguments": arguments, "env": env, "cwd": str(cwd), "stdout": str(stdout),
                   "stderr": str(stderr) if stderr else None}
        # One start at a time: the next pid reported is this request's.
        with self._lock:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            with self._changed:
                if not self._changed.wait_for(lambda: self._started or self._gone, 30) or not self._started:
                    raise RuntimeError("the test launcher did not start the process")
                return Launched(self, args, self._started.pop())

    def returncode(self, pid: int, timeout: float | None) -> int | None:
        """How ``pid`` ended, waiting up to ``timeout`` s (None: as long as it takes); None if it still runs."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._ended or self._gone, timeout)
            if pid not in self._ended and self._gone:
                raise RuntimeError("the test launcher is gone")
            return self._ended.get(pid)

    def close(self) -> None:
        """Stop the launcher (the processes it started are the tests' to stop)."""
        self._process.stdin.close()
        self._process.wait(10)


_launcher: Launcher | None = None
_creating = threading.Lock()


def launcher() -> Launcher:
    """This pytest process's launcher, started at first use."""
    global _launcher
    with _creating:
        if _launcher is None:
            _launcher = Launcher()
        return _launcher


def close() -> None:
    """Stop this pytest process's launcher if it was started."""
    if _launcher is not None:
        _launcher.close()


if __name__ == "__main__":
    main()
