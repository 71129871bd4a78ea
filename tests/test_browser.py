"""JupyterLab in a real headless Chromium, started the way ``make lab`` starts it.

``dfkd.lab`` (what ``make lab`` runs) starts on a free 127.0.0.1 port with a token; its state
folder (settings the user changes, workspaces, runtime, IPython) is a temporary one, autosave is off
there so the committed sources are never rewritten, and ``DFKD_RUNS`` points at an empty folder.
Debian's ``chromium`` is driven through Playwright (``executable_path``: ``playwright install``
downloads browsers and is not used). The test double-clicks ``notebooks`` and then
``00_overview.py`` in the file browser, checks that a notebook (not a text editor) opened, runs all
cells from the Run menu, and checks that the outputs hold an ``<img>``, no ``<Figure ...>`` text and
no error. A second test runs notebook 30 smoke-sized (papermill, as ``python -m dfkd.batch
--smoke`` does) into the lab's runs folder, opens its ``executed.ipynb`` in JupyterLab and checks
that the curve cell (``figures.curves_figure``) renders an ``<img>``, not ``<Figure ...>`` text.
Screenshots go to ``$DFKD_TEST_ARTEFACTS/browser/`` (default: pytest's temporary folder, printed
with ``-rA``); they are test artefacts, never committed.

Outside CI a missing browser or Playwright skips the test with an install hint; under
``CI=true`` it fails (``.ci/run`` installs chromium when it is missing).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

import yaml

from dfkd import batch, lab, paths

ROOT = paths.project_root()
NOTEBOOK = "notebooks/00_overview.py"
DISTILL_NOTEBOOK = "notebooks/30_distillation.py"
INSTALL_HINT = ("install a browser and Playwright: `apt-get update && apt-get install -y chromium` and "
                "`.venv/bin/pip install playwright` (not `playwright install`); or set DFKD_CHROMIUM "
                "to a Chromium/Chrome executable")
START_TIMEOUT = 90  # s for JupyterLab to answer
RUN_TIMEOUT = 120   # s for "Run All Cells" to finish

pytestmark = [pytest.mark.notebooks, pytest.mark.timeout(300)]


def _missing(msg: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg} under CI; {INSTALL_HINT}")
    pytest.skip(f"{msg}; {INSTALL_HINT}")


def _chromium() -> str:
    for cand in (os.environ.get("DFKD_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and (path := shutil.which(cand)):
            return path
    _missing("no Chromium found (chromium, chromium-browser, google-chrome)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    base = os.environ.get("DFKD_TEST_ARTEFACTS")
    out = Path(base) / "browser" if base else tmp_path_factory.mktemp("browser")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def lab_runs():
    """The lab's (empty) runs folder: inside the project, because JupyterLab serves files under its
    root only (runs/ is git-ignored); removed afterwards."""
    path = ROOT / "runs" / f"_browser_test_{os.getpid()}_{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory, lab_runs):
    """``(base_url, token)`` of JupyterLab started as ``make lab`` starts it (``dfkd.lab``)."""
    tmp = tmp_path_factory.mktemp("lab")
    state = tmp / "state"
    env = lab.lab_env(ROOT, state)
    env["DFKD_RUNS"] = str(lab_runs)
    env.pop("TQDM_DISABLE", None)
    settings = Path(env["JUPYTERLAB_SETTINGS_DIR"]) / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    for key in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR", "JUPYTER_DATA_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    port, token = _free_port(), secrets.token_hex(16)
    cmd = lab.lab_command(root=ROOT, port=port, token=token, open_browser=False,
                          extra=["--ServerApp.port_retries=0"])
    log_path = tmp / "lab.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer in {START_TIMEOUT} s:\n{log_path.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{base}/lab", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        yield base, token, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _dblclick_item(page, name: str, timeout: float = 30_000):
    item = page.locator("li.jp-DirListing-item").filter(has=page.get_by_text(name, exact=True))
    item.first.wait_for(state="visible", timeout=timeout)
    item.first.dblclick()


def _menu(page, top: str, entry: str):
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(rf"^{re.escape(top)}$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(rf"^{re.escape(entry)}$")).first.click()


def _playwright():
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed")
    return chromium, sync_playwright


def _keep_failure(page, artefacts: Path, log_path: Path, console: list[str]) -> None:
    """What the browser showed when a test failed, beside the server log."""
    if page is None:
        return
    try:
        page.screenshot(path=str(artefacts / "99_failure.png"), full_page=True)
        (artefacts / "99_failure.html").write_text(page.content())
        shutil.copy(log_path, artefacts / "99_failure_lab.log")
        (artefacts / "99_failure_console.txt").write_text("\n".join(console))
    except Exception:
        pass


@contextmanager
def _lab_page(chromium, sync_playwright, artefacts: Path, log_path: Path):
    """A headless Chromium page (1400 x 1000); on failure the page, its console and the server log
    are kept in ``artefacts`` (99_failure.*)."""
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=args + ["--disable-gpu"])
        page, console = None, []
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            yield page
        except BaseException:
            _keep_failure(page, artefacts, log_path, console)
            raise
        finally:
            browser.close()


def _find_code_cell(page, panel, text: str, timeout_s: float = 60.0):
    """The code cell(s) whose source contains ``text``. JupyterLab 4 renders a long notebook's cells
    lazily (windowing): a cell below the fold may not be in the DOM until the notebook is scrolled
    towards it, so scroll down most of a screen at a time until it is."""
    cell = panel.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=text))
    deadline = time.monotonic() + timeout_s
    while cell.count() == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"no code cell containing {text!r} after scrolling the notebook for {timeout_s:.0f} s")
        panel.locator(".jp-WindowedPanel-outer").first.evaluate(
            "e => { e.scrollTop = e.scrollTop + e.clientHeight * 0.8; }")
        page.wait_for_timeout(300)
    return cell


_PROMPTS = ("() => [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')]"
            ".map(e => e.textContent.trim())")


def _run_all_cells(page, attempts: int = 3, started_s: float = 30.0) -> None:
    """Run > Run All Cells, then wait until every code cell's prompt reads ``[n]:``. A click that
    did not start anything (no prompt turned ``[*]:`` or ``[n]:`` within ``started_s``: a menu
    click lost on a loaded machine) is repeated, up to ``attempts`` clicks. A timeout names the
    prompts and the kernel status it saw."""
    started = (f"() => ({_PROMPTS})().some(t => /^\\[(\\*|\\d+)\\]:$/.test(t))")
    done = (f"() => {{ const p = ({_PROMPTS})(); "
            "return p.length > 0 && p.every(t => /^\\[\\d+\\]:$/.test(t)); }")
    for attempt in range(1, attempts + 1):
        _menu(page, "Run", "Run All Cells")
        try:
            page.wait_for_function(started, timeout=started_s * 1000, polling=500)
            break
        except Exception:
            if attempt == attempts:
                raise AssertionError(f"Run All Cells started nothing after {attempts} clicks; prompts: "
                                     f"{page.evaluate(_PROMPTS)}") from None
    try:
        page.wait_for_function(done, timeout=RUN_TIMEOUT * 1000, polling=500)
    except Exception:
        status = page.locator(".jp-Notebook-ExecutionIndicator").first.get_attribute("data-status")
        raise AssertionError(f"cells not all run after {RUN_TIMEOUT} s; prompts: {page.evaluate(_PROMPTS)}; "
                             f"kernel status: {status}") from None


def test_overview_opens_as_notebook_and_runs_with_images(jupyterlab, artefacts):
    chromium, sync_playwright = _playwright()
    base, token, log_path = jupyterlab
    source_before = (ROOT / NOTEBOOK).read_bytes()
    with _lab_page(chromium, sync_playwright, artefacts, log_path) as page:
        page.goto(f"{base}/lab?token={token}", wait_until="domcontentloaded")
        # the file browser at the project root: double-click into notebooks/, then the source
        _dblclick_item(page, "notebooks", timeout=60_000)
        _dblclick_item(page, Path(NOTEBOOK).name)
        panel = page.locator(".jp-NotebookPanel:visible")
        panel.first.wait_for(state="visible", timeout=60_000)
        cells = panel.first.locator(".jp-Cell")
        page.wait_for_function("document.querySelectorAll('.jp-NotebookPanel .jp-Cell').length > 3",
                               timeout=30_000)
        assert page.locator(".jp-FileEditor:visible").count() == 0, "opened in the text editor"
        n_cells = cells.count()
        page.screenshot(path=str(artefacts / "01_opened.png"))
        dirty_on_open = page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count() > 0

        # kernel ready (python3 from the notebook's kernelspec: no kernel dialog), then run all
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
        page.wait_for_timeout(500)
        # JupyterLab writes the kernel's language_info when the kernel starts: dfkd.lab_contents
        # serves the same one, so that write is no change (tests/test_lab_contents.py)
        dirty_with_kernel = page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count() > 0
        t0 = time.monotonic()
        _run_all_cells(page)
        run_s = time.monotonic() - t0
        page.wait_for_timeout(500)
        outputs = panel.first.locator(".jp-OutputArea-output")
        imgs = panel.first.locator(".jp-OutputArea-output img")
        assert imgs.count() >= 1, "no <img> in the outputs: the figure cell did not render an image"
        imgs.first.scroll_into_view_if_needed()
        page.screenshot(path=str(artefacts / "02_ran_all.png"), full_page=True)
        panel.first.screenshot(path=str(artefacts / "03_notebook_panel.png"))
        text = "\n".join(outputs.all_inner_texts())
        errors = panel.first.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        err_text = "\n".join(errors.all_inner_texts())
        assert not re.search(r"Traceback|\w+Error\b", err_text), err_text[-3000:]
        assert "<Figure size" not in text, "a figure showed as text, not as an image"
        print(f"browser: {NOTEBOOK} opened as a notebook ({n_cells} cells), ran in {run_s:.1f} s, "
              f"{imgs.count()} image(s); modified on open: {dirty_on_open}, once the kernel ran: "
              f"{dirty_with_kernel}; screenshots: {artefacts}")
        assert not dirty_on_open and not dirty_with_kernel, "the notebook showed as modified on open"
    assert (ROOT / NOTEBOOK).read_bytes() == source_before, f"{NOTEBOOK} was rewritten by JupyterLab"


def test_distillation_curves_render_as_images_after_a_smoke_run(jupyterlab, lab_runs, artefacts, tmp_path):
    """Notebook 30 smoke-sized through papermill (random teacher, a few steps, ~20 s), then its
    executed.ipynb in JupyterLab: the curve cell shows an <img>, not the text <Figure size ...>."""
    chromium, sync_playwright = _playwright()   # skip before running anything when no browser
    base, token, log_path = jupyterlab
    manifest = tmp_path / "browser.yaml"
    manifest.write_text(yaml.safe_dump({"jobs": [{
        "name": "distill", "notebook": DISTILL_NOTEBOOK, "stage": "distill", "run": "browser_distill",
        "set": {"teacher_run": ""}}]}))
    (job,) = batch.resolve_jobs(manifest, smoke=True)
    assert batch.run_job(job, runs_root=lab_runs, log=lambda *a, **k: None) == batch.DONE, \
        (job.run_dir(lab_runs) / "FAILED").read_text() if (job.run_dir(lab_runs) / "FAILED").exists() else ""
    executed = job.run_dir(lab_runs) / "executed.ipynb"
    rel = executed.relative_to(ROOT).as_posix()
    with _lab_page(chromium, sync_playwright, artefacts, log_path) as page:
        page.goto(f"{base}/lab/tree/{rel}?token={token}", wait_until="domcontentloaded")
        panel = page.locator(".jp-NotebookPanel:visible").first
        panel.wait_for(state="visible", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell').length > 3",
                               timeout=30_000)
        curve = _find_code_cell(page, panel, "curves_figure")
        assert curve.count() == 1, f"{curve.count()} cells call figures.curves_figure in {rel}"
        curve.first.scroll_into_view_if_needed()
        imgs = curve.first.locator(".jp-OutputArea-output img")
        imgs.first.wait_for(state="attached", timeout=30_000)
        text = "\n".join(curve.first.locator(".jp-OutputArea-output").all_inner_texts())
        curve.first.screenshot(path=str(artefacts / "04_distill_curve_cell.png"))
        page.screenshot(path=str(artefacts / "05_distill_executed.png"), full_page=True)
        assert imgs.count() >= 1, "the curve cell shows no <img>"
        assert "<Figure size" not in text, f"the curve cell shows a figure as text: {text[:200]!r}"
        all_text = "\n".join(panel.locator(".jp-OutputArea-output").all_inner_texts())
        assert "<Figure size" not in all_text, "a figure of notebook 30 showed as text, not as an image"
        print(f"browser: {rel} opened; curve cell: {imgs.count()} image(s); screenshots: {artefacts}")
