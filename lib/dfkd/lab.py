"""``make lab``: JupyterLab from the project's venv with the project's own settings.

``python -m dfkd.lab [--port N] [jupyter lab options...]`` starts ``jupyter lab`` on 127.0.0.1 with

- ``JUPYTER_CONFIG_DIR=<project>/jupyter_config`` (committed): the server config there enables
  jupytext's contents manager, and ``labconfig/default_setting_overrides.json`` makes *Jupytext
  Notebook* the default viewer of Python files, so a double-click on ``notebooks/*.py`` opens a
  notebook (the JupyterLab setting ``@jupyterlab/docmanager-extension:plugin`` ->
  ``defaultViewers``, which ``jupytext-config set-default-viewer`` would write into the user's home);
- everything JupyterLab, IPython and matplotlib would write (user settings, workspaces, runtime
  files, kernel history, font cache) under ``<project>/.jupyter-state/`` (git-ignored), so nothing
  is written into the user's home and the user's own ``~/.jupyter`` does not apply;
- the kernel ``python3``, which jupyter_client runs with this interpreter (the project's venv).

:func:`lab_env` and :func:`lab_command` are what ``tests/test_browser.py`` starts, too.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import paths

CONFIG_DIR = "jupyter_config"    # committed: server config + labconfig/default_setting_overrides.json
STATE_DIR = ".jupyter-state"     # git-ignored: what JupyterLab writes while it runs


def lab_env(root: str | os.PathLike | None = None, state: str | os.PathLike | None = None,
            base: dict | None = None) -> dict:
    """The environment ``make lab`` runs JupyterLab in (``base`` defaults to ``os.environ``)."""
    root = Path(root or paths.project_root()).resolve()
    state = Path(state or root / STATE_DIR).resolve()
    env = dict(os.environ if base is None else base)
    env.update({
        "JUPYTER_CONFIG_DIR": str(root / CONFIG_DIR),
        "JUPYTERLAB_SETTINGS_DIR": str(state / "lab" / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(state / "lab" / "workspaces"),
        "JUPYTER_DATA_DIR": str(state / "data"),
        "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
        "IPYTHONDIR": str(state / "ipython"),
        "MPLCONFIGDIR": str(state / "matplotlib"),
        "JUPYTER_PLATFORM_DIRS": "1",
    })
    env.pop("JUPYTER_PATH", None)  # no other data dirs: the venv's kernels and lab extensions only
    return env


def lab_command(*, root: str | os.PathLike | None = None, port: int = 8888, token: str | None = None,
                open_browser: bool = True, extra=()) -> list[str]:
    """``python -m jupyterlab ...`` on 127.0.0.1:``port`` serving the project folder."""
    root = Path(root or paths.project_root()).resolve()
    cmd = [sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           f"--ServerApp.root_dir={root}", f"--ServerApp.open_browser={open_browser}"]
    if token is not None:
        cmd.append(f"--IdentityProvider.token={token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers run as root
    return cmd + list(extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfkd.lab", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=int(os.environ.get("LAB_PORT", 8888)))
    ap.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    args, extra = ap.parse_known_args(argv)
    root = paths.project_root()
    env = lab_env(root)
    for key in ("JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
                "MPLCONFIGDIR", "JUPYTER_DATA_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    cmd = lab_command(root=root, port=args.port, open_browser=not args.no_browser, extra=extra)
    print(f"JupyterLab on http://127.0.0.1:{args.port}/lab (settings: {root / CONFIG_DIR}); "
          "open notebooks/00_overview.py first. Ctrl-C stops it.", flush=True)
    os.chdir(root)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
