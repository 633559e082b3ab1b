"""No network: the default dataset (wikitext2) fails at once, naming the built-in and local alternatives, and a
missing model is reported as a missing model, before any data is read.

The end-to-end cases run the CLI in a fresh process with the offline switches unset and the hub's endpoint on
this machine's loopback (refusing, or answering 404 like the hub), so they are deterministic and do not depend
on whether the real hub is reachable; the servers count the connections the process made."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import llmprune
from llmprune import hub

ROOT = Path(__file__).resolve().parent.parent


class _Dropper:
    """A loopback port that accepts each connection and closes it unanswered: a hub that cannot be reached."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


class _NotFound(BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a repository it does not have."""

    requests: list[str] = []

    def _answer(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "Repository not found"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def dropper():
    server = _Dropper()
    yield server
    server.close()


@pytest.fixture
def not_found():
    _NotFound.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _NotFound.requests
    server.shutdown()
    server.server_close()


def _cli(args: list[str], endpoint: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``llmprune ARGS`` as a user runs it with no offline switch set, the hub at ``endpoint``, empty caches."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for key in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE"):
        env.pop(key, None)  # all under HF_HOME
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmprune", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    return proc, time.perf_counter() - t0


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_the_probe_tells_a_dead_endpoint_from_a_live_one(dropper, not_found, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the probe runs only when it is
    t0 = time.perf_counter()
    assert "Error" in hub.unreachable(dropper.url)
    refused = socket.create_server(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()
    assert "refused" in hub.unreachable(f"http://127.0.0.1:{port}").lower()
    assert time.perf_counter() - t0 < hub.PROBE_TIMEOUT_S  # one try each, no retries
    assert dropper.connections == 1
    url, requests = not_found
    assert hub.unreachable(url) is None  # a 404 is an answer: the hub is up
    assert requests == ["HEAD /"]


@pytest.mark.parametrize("command", [["compress", "{model}", "--out", "o", "--device", "cpu"],
                                     ["eval-ppl", "{model}", "--device", "cpu"]], ids=["compress", "eval-ppl"])
def test_the_default_dataset_offline_fails_at_once_naming_the_alternatives(command, tiny_model_dir, dropper,
                                                                          tmp_path):
    proc, seconds = _cli([a.replace("{model}", str(tiny_model_dir)) for a in command], dropper.url, tmp_path)
    line = _one_error_line(proc)
    assert "dataset 'wikitext2' cannot be reached: the Hugging Face hub does not answer" in line
    assert "not in the datasets cache" in line
    assert "'shakespeare' (the built-in text)" in line and "local .txt/.jsonl/.json/.parquet file" in line
    # one probe, then the datasets client's cache only: before, it retried with backoff for about 25 s
    assert dropper.connections == 1
    assert seconds < 60, seconds
    assert not (tmp_path / "o").exists()


def test_a_missing_hub_model_is_named_before_the_default_dataset(dropper, tmp_path):
    proc, _ = _cli(["compress", "no-such-org/no-such-model", "--out", "o"], dropper.url, tmp_path)
    line = _one_error_line(proc)
    assert line.startswith("llmprune: error: cannot load model 'no-such-org/no-such-model': the Hugging Face hub"
                           " does not answer")
    assert "not in the Hugging Face cache" in line and "dataset" not in line
    assert dropper.connections == 1


def test_a_model_the_hub_does_not_have_is_named_as_such(not_found, tmp_path):
    url, requests = not_found
    proc, _ = _cli(["compress", "no-such-org/no-such-model", "--out", "o"], url, tmp_path)
    line = _one_error_line(proc)
    assert "cannot load model 'no-such-org/no-such-model' (the Hugging Face hub has no such model" in line
    assert not any("dataset" in r for r in requests)  # no dataset asked for: the model came first


def test_offline_in_process_the_model_comes_before_the_data(tiny_model_dir, tmp_path):
    """HF_HUB_OFFLINE (as the test suite runs): the same order from Python, with no probe at all."""
    assert hub.offline() == "HF_HUB_OFFLINE is set"
    for call in (lambda: llmprune.compress("no-such-org/no-such-model", tmp_path / "o", calib="wikitext2"),
                 lambda: llmprune.evaluate("no-such-org/no-such-model", "wikitext2"),
                 lambda: llmprune.sweep("no-such-org/no-such-model", tmp_path / "s", methods="wanda",
                                        sparsities="0.5", evals="wikitext2")):
        with pytest.raises(llmprune.UsageError, match="cannot load model 'no-such-org/no-such-model': HF_HUB_OFFLINE"
                                                      " is set and it is not in the Hugging Face cache"):
            call()
    with pytest.raises(llmprune.UsageError, match="dataset 'wikitext2' cannot be reached: HF_HUB_OFFLINE is set"):
        llmprune.evaluate(tiny_model_dir, "wikitext2")
