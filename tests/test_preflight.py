"""Before a run: weights cached or reachable, endpoints answering; one line and exit 2 otherwise.

Everything here is local: a Hugging Face cache folder written by the test, a loopback server that
answers ``GET /models``, and a closed loopback port. No model is loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from visa import preflight
from visa.recipe import RecipeError, load_recipe
from visa.scoring import check_runnable


def _recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(body)
    return path


@pytest.fixture()
def models_server():
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            data = json.dumps({"object": "list", "data": [{"id": "served-model", "object": "model"}]}).encode()
            self.send_response(200 if self.path.rstrip("/") == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _judge(base_url: str, model: str) -> str:
    return f"""
scores:
  dp:
    agents:
      - {{name: j, type: judge, params: {{backend: {{type: openai, params: {{base_url: '{base_url}', model: {model}}}}}}}}}
"""


def test_endpoints(tmp_path, models_server):
    assert not preflight.problems(load_recipe(_recipe(tmp_path, _judge(models_server, "served-model"))))
    wrong = preflight.problems(load_recipe(_recipe(tmp_path, _judge(models_server, "other-model"))))
    assert wrong == [f"dp.j: endpoint {models_server} serves served-model, not other-model"]
    started = time.perf_counter()
    down = preflight.problems(load_recipe(_recipe(tmp_path, _judge(f"http://127.0.0.1:{_closed_port()}/v1", "m"))))
    assert len(down) == 1 and "does not answer" in down[0]
    assert time.perf_counter() - started < preflight.TIMEOUT_S + 2  # one try, no retries


def _sam2(model_id: str, revision: str = "main", offline: bool = True) -> str:
    return f"""
execution: {{hf_offline: {str(offline).lower()}}}
scores:
  sc:
    agents:
      - {{name: sam2, type: sam2, params: {{model_id: '{model_id}', revision: {revision}}}}}
"""


def test_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # huggingface_hub reads the variable once, when it is first imported (an earlier test may have done so).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    local = tmp_path / "model"
    local.mkdir()
    assert not preflight.problems(load_recipe(_recipe(tmp_path, _sam2(str(local)))))
    missing = preflight.problems(load_recipe(_recipe(tmp_path, _sam2(str(tmp_path / "absent")))))
    assert missing == [f"sc.sam2: model folder {tmp_path / 'absent'} does not exist"]
    offline = preflight.problems(load_recipe(_recipe(tmp_path, _sam2("org/sam-model", "abc123"))))
    assert offline == ["sc.sam2: weights of org/sam-model@abc123 are not in the local Hugging Face cache and "
                       "the network is not allowed"]
    # The same model, cached at that revision (the cache layout huggingface_hub reads).
    snapshot = tmp_path / "hub" / "models--org--sam-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert not preflight.problems(load_recipe(_recipe(tmp_path, _sam2("org/sam-model", "abc123"))))
    with pytest.raises(RecipeError, match="cannot run here: sc.sam2: weights of org/sam-model@main"):
        check_runnable(load_recipe(_recipe(tmp_path, _sam2("org/sam-model", "main"))))


def test_score_refuses_in_one_line_before_any_work(tmp_path):
    recipe = _recipe(tmp_path, _judge(f"http://127.0.0.1:{_closed_port()}/v1", "m"))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "hello"}]}]))
    proc = subprocess.run(
        [sys.executable, "-m", "visa.cli", "score", "--recipe", str(recipe), "--data", str(data),
         "--out", str(tmp_path / "run")],
        capture_output=True, timeout=120, text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "dp.j: endpoint" in lines[0] and "does not answer" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
