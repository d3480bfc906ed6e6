"""Start and stop a real ComfyUI server (main.py) on loopback, with this pack installed (tests, demo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional, Tuple

from .comfy_runtime import COMFYUI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether a server could not bind ``port`` on loopback (SO_REUSEADDR, as aiohttp binds)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class ComfyServer:
    def __init__(self, workdir: str, extra_args: Tuple[str, ...] = (), port: Optional[int] = None, cpu: bool = True):
        self.port = port or free_port()
        self.cpu = cpu
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.log_path = os.path.join(workdir, "server.log")
        self.extra_args = extra_args
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for sub in ("output", "temp", "input", "user"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        args = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
                "--port", str(self.port),
                "--output-directory", os.path.join(self.workdir, "output"),
                "--temp-directory", os.path.join(self.workdir, "temp"),
                "--input-directory", os.path.join(self.workdir, "input"),
                "--user-directory", os.path.join(self.workdir, "user"), *self.extra_args]
        self._log = open(self.log_path, "w")
        # Own process group, so stop() also ends anything the server started.
        self.proc = subprocess.Popen(args, cwd=COMFYUI, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited during start-up:\n" + self.log())
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("ComfyUI did not start in time:\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: Dict[str, Any]) -> Tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def wait_for(self, prompt_id: str, timeout: float = 120.0) -> Dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n" + self.log()[-4000:])
