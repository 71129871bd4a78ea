"""A real Jupyter server with the project's configuration serves notebooks/*.py as notebooks.

Starts ``python -m jupyter_server`` on 127.0.0.1 (free port, token auth, root = the checkout,
personal ~/.jupyter config masked, so only the environment's server extensions and the project's
``jupytext.toml`` apply), then asks the contents API for every ``notebooks/*.py`` with
``type=notebook``: the plain contents manager refuses that for a .py file, so a notebook answer
shows jupytext's contents manager is active. The ``parameters`` cell must come back intact.

Until the real notebooks exist a sample py:percent notebook (written into a temporary folder
under ``tests/``, removed afterwards) stands in; it is also used for a save round trip through the
API, which checks that jupytext.toml keeps the ``parameters`` tag and drops volatile metadata.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import jupytext
import pytest

from dfkd import batch, paths

ROOT = paths.project_root()
REAL = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.py"))
SAMPLE = "<sample>"
START_TIMEOUT = 60  # s

SAMPLE_SRC = '''\
# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sample notebook (test_jupyter_server)

# %% tags=["parameters"]
run_name: str = "dev"      # folder under runs/<stage>/
epochs: int = 2
lr: float = 0.05           # "#" inside a value: "a # b"
tag: str = "a # b"
interactive: bool = True

# %%
print(run_name, epochs, lr, tag, interactive)
'''

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, token: str, sample_dir: Path):
        self.base, self.token, self.sample_dir = f"http://127.0.0.1:{port}", token, sample_dir

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        req = urllib.request.Request(
            self.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def server():
    tmp = Path(tempfile.mkdtemp(prefix="dfkd-jupyter-"))
    sample_dir = Path(tempfile.mkdtemp(prefix="_jupyter_tmp_", dir=ROOT / "tests"))  # not hidden
    (sample_dir / "sample.py").write_text(SAMPLE_SRC)
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "rt"),
           "IPYTHONDIR": str(tmp / "ipython"), "JUPYTER_PLATFORM_DIRS": "1"}
    log = open(tmp / "server.log", "wb")
    cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
           "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={ROOT}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers / CI run as root
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(port, token, sample_dir)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter server exited ({proc.returncode}):\n{(tmp / 'server.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter server did not answer in {START_TIMEOUT} s:\n"
                            f"{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                if srv.request("GET", "/api/status", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        srv.log = tmp / "server.log"
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(sample_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _rel(server, name: str) -> str:
    return (server.sample_dir / "sample.py").relative_to(ROOT).as_posix() if name == SAMPLE else name


def _param_cells(cells) -> list[dict]:
    return [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def _get_notebook(server, rel: str) -> dict:
    status, model = server.request("GET", f"/api/contents/{rel}?type=notebook&content=1")
    assert status == 200, (f"{rel} was not served as a notebook ({status}: {model}); is the jupytext "
                           "server extension enabled? (jupyter server extension list)")
    assert model["type"] == "notebook" and model["format"] == "json"
    return model


@pytest.mark.parametrize("name", REAL or [SAMPLE])
def test_notebook_sources_open_as_notebooks(server, name):
    rel = _rel(server, name)
    model = _get_notebook(server, rel)
    cells = model["content"]["cells"]
    assert cells and all(c["cell_type"] in ("code", "markdown", "raw") for c in cells)
    disk = _param_cells(jupytext.read(ROOT / rel).cells)
    served = _param_cells(cells)
    assert len(served) == len(disk) <= 1
    if disk or name == SAMPLE:
        assert served and served[0]["cell_type"] == "code"
        assert served[0]["source"] == disk[0]["source"]
        assert batch.parse_parameters(served[0]["source"]) == batch.notebook_parameters(ROOT / rel)
    # saving from JupyterLab (here: to a scratch path) must reproduce the committed source
    copy = (server.sample_dir / "saved" / Path(rel).name).relative_to(ROOT).as_posix()
    (server.sample_dir / "saved").mkdir(exist_ok=True)
    status, _ = server.request("PUT", f"/api/contents/{copy}", {"type": "notebook", "format": "json",
                                                                "content": model["content"]})
    assert status in (200, 201)
    assert (ROOT / copy).read_text() == (ROOT / rel).read_text(), f"saving {rel} would change it"


def test_sample_kernel_and_save_round_trip(server):
    rel = _rel(server, SAMPLE)
    model = _get_notebook(server, rel)
    nb = model["content"]
    assert nb["metadata"].get("kernelspec", {}).get("language") == "python"  # no kernel prompt
    params = _param_cells(nb["cells"])[0]
    params["metadata"]["execution"] = {"iopub.status.busy": "2024-01-01T00:00:00Z"}  # volatile
    saved = rel.replace("sample.py", "saved.py")
    status, _ = server.request("PUT", f"/api/contents/{saved}", {"type": "notebook", "format": "json",
                                                                 "content": nb})
    assert status in (200, 201)
    text = (ROOT / saved).read_text()
    assert '# %% tags=["parameters"]' in text
    assert "execution" not in text and "jupytext_version" not in text
    assert batch.notebook_parameters(ROOT / saved) == batch.notebook_parameters(ROOT / rel)
    assert text == (ROOT / rel).read_text()  # the committed form is a fixed point of a save
