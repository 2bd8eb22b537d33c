"""Drive a real ComfyUI server: start it, turn UI workflows into API prompts, queue, collect.

Used by the demo (scripts/demo.py) and the end-to-end tests. Standard library only.
"""
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
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ComfyUI server process on 127.0.0.1 (CPU), stopped on exit of the with-block.

    ``pytorch_attention`` starts it with ``--use-pytorch-cross-attention``: on the CPU the host
    otherwise picks its sub-quadratic attention, slower there (measured: the same at 64 px, 1.16x
    at 256 px; BENCHMARKS.md, "Attention on the CPU")."""

    def __init__(self, host_dir: Path, python: str = sys.executable, output_dir: Path | None = None,
                 extra_model_paths: Path | None = None, log_path: Path | None = None,
                 pytorch_attention: bool = True, threads: int | None = None):
        self.pytorch_attention, self.threads = pytorch_attention, threads
        self.host_dir, self.python = Path(host_dir), python
        self.output_dir, self.extra_model_paths, self.log_path = output_dir, extra_model_paths, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    @classmethod
    def at(cls, url: str) -> "Server":
        """A server already running at ``url`` (started elsewhere; nothing to stop on exit)."""
        server = cls.__new__(cls)
        server.url, server.proc = url.rstrip("/"), None
        return server

    def __enter__(self):
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-metadata"]
        if self.pytorch_attention:
            cmd.append("--use-pytorch-cross-attention")
        if self.output_dir:
            cmd += ["--output-directory", str(self.output_dir)]
        if self.extra_model_paths:
            cmd += ["--extra-model-paths-config", str(self.extra_model_paths)]
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ)
        if self.threads:  # several servers on one machine: share its cores instead of each taking all
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self.proc = subprocess.Popen(cmd, cwd=self.host_dir, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError("ComfyUI did not answer within 180 s")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def outcome(self, prompt: dict, timeout: float = 900, poll: float = 0.5) -> tuple[str, dict]:
        """Queue an API-format prompt and wait for it: ("rejected", the host's validation errors),
        ("error", the execution_error of the node that raised) or ("ok", the history entry).

        The host queues a prompt whose outputs are only partly valid with the invalid ones left
        out; that counts as rejected (after the rest has run)."""
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt, "client_id": "cmlora"}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                queued = json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 400:
                return "rejected", json.loads(e.read() or b"{}")
            raise RuntimeError(f"POST /prompt failed ({e.code}): {e.read().decode(errors='replace')}") from e
        pid = queued["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    return "error", msgs[0][1] if msgs else {"exception_message": str(status)}
                if queued.get("node_errors"):
                    return "rejected", {"node_errors": queued["node_errors"]}
                if status.get("completed", True):
                    return "ok", entry
            time.sleep(poll)
        raise RuntimeError(f"prompt {pid} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 900, poll: float = 0.5) -> dict:
        """Queue an API-format prompt and wait for its history entry; raise on failure."""
        kind, result = self.outcome(prompt, timeout, poll)
        if kind == "rejected":
            raise RuntimeError(f"POST /prompt failed (400): {json.dumps(result)}")
        if kind == "error":
            raise RuntimeError(f"workflow failed: {result.get('exception_message', '')}")
        return result


FRONTEND_ONLY = ("Note", "MarkdownNote")  # drawn by the frontend, never sent to the server


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (what the editor saves) to the API prompt format.

    Widget values are matched to the node's widget inputs in schema order (required, then
    optional), with the extra 'control_after_generate' value that seeds carry; links become
    [source node id, output slot].
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:  # muted / bypassed / notes
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        order = info.get("input_order", {})
        for section in ("required", "optional"):
            names = order.get(section) or list(info["input"].get(section, {}))
            for name in names:
                spec = info["input"][section][name]
                kind = spec[0]
                is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
                link = linked.get(name)
                if is_widget and values:
                    value = values.pop(0)
                    if (spec[1] if len(spec) > 1 else {}).get("control_after_generate") and values:
                        values.pop(0)
                    if link is None:
                        inputs[name] = value
                if link is not None:
                    src = links[link]
                    inputs[name] = [str(src[1]), src[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def output_images(entry: dict, kind: str = "output") -> list[dict]:
    """Images a prompt saved (``kind`` "output"), or showed in preview nodes ("temp")."""
    images = []
    for out in entry.get("outputs", {}).values():
        images.extend(i for i in out.get("images", []) if i.get("type", "output") == kind)
    return images


def output_texts(entry: dict) -> list[str]:
    texts = []
    for out in entry.get("outputs", {}).values():
        for t in out.get("text", []):
            texts.append(t if isinstance(t, str) else json.dumps(t))
    return texts
