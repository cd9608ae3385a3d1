"""The web app end to end, in a real headless Chromium (Debian's `chromium`, driven by Playwright):
sign in, create a dataset, upload images (one by drag and drop), edit a caption, create a job from
the SD 1.5 preset with the tiny model (form + YAML editor with an inline error), run it to the end,
see progress, previews and the metrics charts, then clone it into a long job, start it and stop it;
quick train, YAML import, the settings page and the dashboard's GPU cards.

`aitk ui` runs as a subprocess on a free port with AI_TOOLKIT_AUTH set and its own worker, in a
temporary home. Screenshots go to tests/e2e/artifacts/ (kept after the run, gitignored).

Needs the built app (ui/dist, `make ui`), Chromium and the `playwright` package: `make test`
provides all three. Run alone: `make ui && .venv/bin/python -m pytest tests/e2e`. Without them the
test is skipped, or fails when AITK_E2E_REQUIRED=1 (as `make test` sets it).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DIST_INDEX = REPO / "ui" / "dist" / "index.html"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKEN = "e2e-" + secrets.token_hex(16)
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.slow


def chromium_path() -> str | None:
    for candidate in (os.environ.get("AITK_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def missing(reason: str) -> None:
    if os.environ.get("AITK_E2E_REQUIRED") == "1":
        pytest.fail(f"e2e prerequisites missing: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    root: Path
    model: Path
    process: subprocess.Popen
    log: Path

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_sd15: Path) -> Iterator[Server]:
    if not DIST_INDEX.is_file():
        missing("the web app is not built (ui/dist/index.html); run `make ui`")
    root = tmp_path_factory.mktemp("e2e")
    port = free_port()
    log = ARTIFACTS / "server.log"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, AI_TOOLKIT_AUTH=TOKEN, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", AITK_UI_STOP_GRACE_S="60")
    env.pop("AITK_DATABASE_URL", None)
    with running_ui(root, port, env, log, cwd=REPO) as process:
        yield Server(f"http://127.0.0.1:{port}", root, tiny_sd15, process, log)


@contextlib.contextmanager
def running_ui(root: Path, port: int, env: dict[str, str], log: Path, *, cwd: Path) -> Iterator[subprocess.Popen]:
    """`aitk ui` on 127.0.0.1:`port` with its home, output and datasets under `root`, once it
    answers; then stopped (Ctrl+C), and any job process it left killed."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "aitk", "ui", "--host", "127.0.0.1", "--port", str(port), "--home", str(root / "home"),
             "--training-folder", str(root / "output"), "--datasets-folder", str(root / "datasets")],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/login", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"`aitk ui` did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield process
    finally:
        try:
            children = psutil.Process(process.pid).children(recursive=True)  # job processes (own sessions)
        except psutil.NoSuchProcess:
            children = []
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        for child in children:  # a job still running after a failed test: it must not outlive the test
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        missing("no chromium found (Debian: apt-get install -y chromium; or set AITK_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -r requirements.txt)")
    with sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def png(rgb: tuple[int, int, int], shape: str, size: int = 80) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (120, 120, 120))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def job_status(server: Server, job_id: int) -> dict[str, Any]:
    return server.api("GET", f"/api/jobs/{job_id}").json()["job"]


def job_id_from(page: Any) -> int:
    match = re.search(r"/jobs/(\d+)", page.url)
    assert match, page.url
    return int(match.group(1))


def wait_count(page: Any, selector: str, at_least: int) -> None:
    page.wait_for_function("([s, n]) => document.querySelectorAll(s).length >= n", arg=[selector, at_least])


def nav(page: Any, name: str) -> None:
    page.locator(".sidebar").get_by_role("link", name=name, exact=True).click()


def fill_path(page: Any, path: str, value: str) -> None:
    """Set the form field of `config.process[0].<path>` (an input, or a select for enums)."""
    field = page.locator(f'[data-path="config.process.0.{path}"]')
    if field.evaluate("(e) => e.tagName") == "SELECT":
        field.select_option(value)
    else:
        field.fill(value)


def write_expert_metrics(path: Path, steps: int) -> None:
    """A metrics file as a WAN 2.2 run with the video alpha schedule writes it: experts switching
    every 100 steps, each going foundation -> balance -> emphasis at its own steps."""
    import json
    import math
    import random

    rng = random.Random(3)
    ends = {"high_noise": (1400, 2600), "low_noise": (1000, 2200)}
    names, alphas = ("foundation", "balance", "emphasis"), (16, 24, 32)
    counts = {"high_noise": 0, "low_noise": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for step in range(steps):
            expert = "high_noise" if (step // 100) % 2 == 0 else "low_noise"
            counts[expert] += 1
            phase = sum(step >= end for end in ends[expert])
            start = ends[expert][phase - 1] if phase else 0
            base = 0.16 if expert == "high_noise" else 0.09
            line = {
                "step": step, "expert": expert, "alpha_enabled": True,
                "loss": base * (1 + 0.6 * math.exp(-step / 700)) * (1 + 0.25 * rng.uniform(-1, 1)),
                "grad_norm": 0.3 + 0.1 * rng.random(), "learning_rate": 1e-4,
                "gradient_stability": 0.45 + 0.1 * rng.random(),
                "gradient_stability_avg": 0.42 + 0.1 * (1 - math.exp(-counts[expert] / 300)),
                "phase": names[phase], "phase_idx": phase, "steps_in_phase": step - start,
                "linear_alpha": alphas[phase], "conv_alpha": None, "loss_slope": -2e-5 * rng.random(),
                "loss_r2": rng.random() * 0.1, "loss_cv": 0.3 + 0.1 * rng.random(), "loss_samples": 200,
                "step_time_s": 2.0, "samples_per_s": 0.5,
            }
            out.write(json.dumps(line) + "\n")


def open_page(browser: Any) -> tuple[Any, Any, list[str]]:
    """A fresh browser context and page; the list collects the page's uncaught errors."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, errors


def signed_in_page(browser: Any, url: str) -> tuple[Any, Any, list[str]]:
    """`open_page`, then `url` with the token given on the sign-in page the server answers with."""
    context, page, errors = open_page(browser)
    page.goto(url)
    page.locator("#t").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    return context, page, errors


def test_ui_end_to_end(server: Server, browser: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    context, page, errors = open_page(browser)

    # --- sign in: the server answers the app's pages with its sign-in page until then
    page.goto(server.url + "/")
    page.locator("#t").fill("wrong-token")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Wrong token.").wait_for()
    page.locator("#t").fill(TOKEN)
    shot(page, "01-login")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Dashboard").wait_for()
    page.get_by_test_id("system").wait_for()
    shot(page, "02-dashboard")

    # --- a dataset with images: one dropped, the others through the file dialog
    nav(page, "Datasets")
    page.get_by_test_id("dataset-name").fill("shapes")
    page.get_by_test_id("create-dataset").click()
    page.get_by_test_id("dataset-page").wait_for()
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}
    files = [(f"{c}_{s}.png", png(rgb, s)) for c, rgb in colours.items() for s in ("circle", "square")]
    dropped = page.evaluate_handle(
        """(files) => { const dt = new DataTransfer();
             for (const f of files) {
               const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
               dt.items.add(new File([bytes], f.name, { type: "image/png" }));
             }
             return dt; }""",
        [{"name": files[0][0], "b64": base64.b64encode(files[0][1]).decode()}],
    )
    page.get_by_test_id("dropzone").dispatch_event("drop", {"dataTransfer": dropped})
    page.locator("[data-item='red_circle.png']").wait_for()
    page.get_by_test_id("file-input").set_input_files(
        [{"name": name, "mimeType": "image/png", "buffer": data} for name, data in files[1:]])
    page.get_by_test_id("upload-note").filter(has_text="5 file(s) uploaded").wait_for()
    page.locator(f"[data-item='{files[-1][0]}']").wait_for()
    assert page.get_by_test_id("dataset-items").locator(".item-card").count() == 6
    page.wait_for_function("() => [...document.querySelectorAll('.thumb img')].every((i) => i.complete && i.naturalWidth > 0)")

    # caption edits, one per item (the trainer reads them), checked on disk through the API
    for name, _ in files:
        card = page.locator(f"[data-item='{name}']")
        colour, shape = name[:-4].split("_")
        card.get_by_test_id("caption").fill(f"a {colour} {shape}, [trigger] style")
        card.get_by_test_id("save-caption").click()
        card.get_by_test_id("caption-state").filter(has_text="saved").wait_for()
    caption = server.api("GET", "/api/datasets/shapes/items/green_square.png/caption").json()["caption"]
    assert caption == "a green square, [trigger] style"
    page.get_by_test_id("inspect-dataset").click()
    page.get_by_test_id("inspect-report").wait_for()
    shot(page, "03-dataset")

    # --- a job from the SD 1.5 preset, made tiny in the form
    nav(page, "New job")
    page.locator("[data-preset='sd15']").click()
    page.get_by_test_id("job-name").fill("e2e_lora")
    dataset_folder = str(server.root / "datasets" / "shapes")
    page.get_by_test_id("job-dataset").select_option(dataset_folder)
    page.get_by_test_id("job-trigger").fill("shp")
    fill_path(page, "model.name_or_path", str(server.model))
    fill_path(page, "device", "cpu")
    fill_path(page, "training_seed", "7")
    fill_path(page, "train.steps", "40")
    fill_path(page, "train.dtype", "fp32")
    fill_path(page, "train.lr", "0.001")
    fill_path(page, "datasets.0.resolution", "64")
    fill_path(page, "network.linear", "4")
    fill_path(page, "network.linear_alpha", "4")
    fill_path(page, "save.save_every", "20")
    fill_path(page, "save.dtype", "float32")
    fill_path(page, "sample.sample_every", "10")
    fill_path(page, "sample.width", "64")
    fill_path(page, "sample.height", "64")
    fill_path(page, "sample.sample_steps", "2")
    # a field error shows under its field
    fill_path(page, "train.batch_size", "0")
    page.locator(".field-bad .field-problem").filter(has_text="batch_size").wait_for()
    shot(page, "04-form-error")
    fill_path(page, "train.batch_size", "2")
    page.locator(".sticky-actions .ok-line").wait_for()
    shot(page, "05-form")

    # --- the YAML editor: an alpha schedule with short phases, an inline error, then valid
    page.get_by_role("tab", name="YAML (advanced)").click()
    editor = page.get_by_test_id("yaml-editor")
    job = yaml.safe_load(editor.input_value())
    process = job["config"]["process"][0]
    assert process["model"]["name_or_path"] == str(server.model) and process["train"]["steps"] == 40
    assert process["datasets"][0]["folder_path"] == dataset_folder
    process["network"]["alpha_schedule"] = {"enabled": True, "alpha_phases": {
        "foundation": {"alpha": 2, "min_steps": 10, "exit_criteria": {
            "loss_improvement_rate_below": 10.0, "min_gradient_stability": 0.0, "min_samples": 5}},
        "balance": {"alpha": 3, "min_steps": 10, "exit_criteria": {
            "loss_improvement_rate_below": 10.0, "min_gradient_stability": 0.3, "min_samples": 5}},
        "emphasis": {"alpha": 4},
    }}
    good = yaml.safe_dump(job, sort_keys=False)
    editor.fill(good.replace("steps: 40", "steps: -5"))
    problem = page.get_by_test_id("yaml-problems").locator(".problem").filter(has_text="train.steps")
    problem.wait_for()
    assert problem.get_by_role("button", name=re.compile(r"line \d+")).count() == 1
    page.locator(".gutter-bad").first.wait_for()
    shot(page, "06-yaml-error")
    editor.fill(good)
    page.get_by_test_id("yaml-ok").wait_for()
    page.get_by_test_id("save-start-job").click()
    page.get_by_test_id("job-detail").wait_for()
    first = job_id_from(page)

    # --- it runs to the end: progress, previews, metrics
    page.get_by_text("40 / 40").first.wait_for(timeout=120_000)
    page.locator("[data-testid=job-status][data-status=completed]").wait_for(timeout=30_000)
    assert job_status(server, first)["status"] == "completed"
    page.get_by_test_id("samples").locator("img").first.wait_for()
    page.wait_for_function("() => { const i = document.querySelector('[data-testid=samples] img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    assert "training complete" in page.get_by_test_id("log").inner_text()
    shot(page, "07-job-completed")
    page.get_by_role("tab", name="Samples").click()
    wait_count(page, "[data-testid=samples] .gallery-row:not(.gallery-head)", 5)  # steps 0, 10, 20, 30, 40
    shot(page, "08-samples")

    page.get_by_role("tab", name="Metrics").click()
    for chart in ("chart-loss", "chart-stability", "chart-lr", "chart-alpha"):
        page.get_by_test_id(chart).locator("svg path").first.wait_for(state="attached")
    assert page.get_by_test_id("chart-loss").locator("svg path").count() >= 2  # loss and its trend line
    wait_count(page, "[data-testid=chart-stability] .band rect", 1)  # the target band
    page.get_by_test_id("chart-alpha").locator(".marker").first.wait_for()  # phase transition
    assert "→" in page.get_by_test_id("chart-alpha").locator(".marker text").first.text_content()
    cards = page.get_by_test_id("metric-cards")
    for label in ("loss", "gradient stability (avg)", "phase", "loss slope"):
        assert cards.get_by_text(label, exact=True).count() >= 1, label
    page.get_by_test_id("chart-loss").locator("svg rect").last.hover()
    page.locator(".chart-tip").first.wait_for()
    shot(page, "09-metrics")

    page.get_by_role("tab", name="Checkpoints").click()
    final = page.get_by_test_id("lora-files").locator("tr", has_text="final")
    final.wait_for()
    href = final.get_by_role("link", name="Download").get_attribute("href")
    download = context.request.get(server.url + href)  # the session cookie, no token in the URL
    assert download.status == 200 and len(download.body()) > 1000
    shot(page, "10-checkpoints")

    # --- a clone made long, started and stopped: a complete checkpoint, status stopped
    page.get_by_test_id("clone-job").click()
    page.get_by_role("heading", name=re.compile("Edit e2e_lora_copy")).wait_for()
    fill_path(page, "train.steps", "100000")
    fill_path(page, "sample.sample_every", "25")
    fill_path(page, "save.save_every", "100000")
    page.locator(".sticky-actions .ok-line").wait_for()
    page.get_by_test_id("save-start-job").click()
    page.get_by_test_id("job-detail").wait_for()
    second = job_id_from(page)
    assert second != first
    page.locator("[data-testid=job-status][data-status=running]").wait_for(timeout=60_000)
    page.wait_for_function(
        "() => /^(\\d+) \\/ 100000$/.test(document.querySelector('.progress-label')?.textContent ?? '')"
        " && Number(document.querySelector('.progress-label').textContent.split(' ')[0]) >= 5", timeout=60_000)
    page.get_by_role("tab", name="Metrics").click()
    page.get_by_test_id("chart-loss").locator("svg path").first.wait_for(state="attached")
    shot(page, "11-running-metrics")
    page.get_by_role("tab", name="Overview").click()
    shot(page, "12-running")
    nav(page, "Dashboard")
    running_row = page.locator("[data-testid=jobs-table] tr[data-job=e2e_lora_copy]")
    running_row.wait_for()
    shot(page, "13-dashboard-running")
    running_row.get_by_role("link", name="e2e_lora_copy").click()
    page.get_by_test_id("stop-job").click()
    page.locator("[data-testid=job-status][data-status=stopped]").wait_for(timeout=90_000)
    stopped = job_status(server, second)
    assert stopped["status"] == "stopped" and stopped["step"] >= 5, stopped
    checkpoints = server.api("GET", f"/api/jobs/{second}/checkpoints").json()["checkpoints"]
    assert checkpoints and checkpoints[0]["complete"], checkpoints
    shot(page, "14-stopped")

    # --- quick train: name, trigger word, images with captions, a model -> a job (not started here)
    nav(page, "Quick train")
    page.locator("#qt-name").fill("qt_lora")
    page.locator("#qt-trigger").fill("qtw")
    page.get_by_test_id("file-input").set_input_files(
        [{"name": name, "mimeType": "image/png", "buffer": data} for name, data in files[:2]])
    captions = page.locator(".quick-train .item-card textarea")
    captions.nth(1).wait_for()
    captions.nth(0).fill("qtw, a red circle")
    captions.nth(1).fill("qtw, a red square")
    page.get_by_label("more options").check()
    page.locator("#qt-model").fill(str(server.model))
    page.locator("#qt-steps").fill("5")
    page.locator("#qt-device").fill("cpu")
    page.get_by_label("start right away").uncheck()
    shot(page, "15-quick-train")
    page.get_by_role("button", name="Create job").click()
    page.get_by_test_id("job-detail").wait_for()
    page.locator("[data-testid=job-status][data-status=idle]").wait_for()
    quick = server.api("GET", "/api/datasets/qt_lora").json()
    assert sorted((i["name"], i["caption"]) for i in quick["items"]) == [
        ("red_circle.png", "qtw, a red circle"), ("red_square.png", "qtw, a red square")]
    assert job_status(server, job_id_from(page))["summary"]["steps"] == 5

    # --- YAML import: a job file from disk into the editor, checked, created
    exported = server.api("GET", f"/api/jobs/{first}/yaml").text.replace("name: e2e_lora", "name: imported_lora", 1)
    nav(page, "New job")
    page.get_by_test_id("yaml-import").set_input_files(
        {"name": "imported.yaml", "mimeType": "application/yaml", "buffer": exported.encode()})
    page.get_by_test_id("yaml-ok").wait_for()
    assert "imported_lora" in page.get_by_test_id("yaml-editor").input_value()
    shot(page, "16-yaml-import")

    # --- the memory plan of the job being edited: it fits the default 24 GB; at 4 MB it does not,
    # the fix is offered as YAML, and applied it fits (planning runs on the server: allow a minute)
    plan = page.get_by_test_id("memory-plan")
    plan.locator("[data-testid=plan-verdict][data-fits=true]").wait_for(timeout=60_000)
    assert re.fullmatch(r"\d+(\.\d)? (KB|MB)", plan.get_by_test_id("plan-peak").inner_text())  # a tiny UNet
    page.get_by_test_id("plan-budget").fill("4MB")
    verdict = plan.locator("[data-testid=plan-verdict][data-fits=false]")
    verdict.wait_for(timeout=60_000)
    assert "does not fit in 4.0 MB" in verdict.inner_text()
    assert "qtype: qfloat8" in plan.get_by_test_id("plan-suggestion").inner_text()
    plan.get_by_test_id("plan-not-counted").locator("summary").click()
    shot(page, "16b-memory-plan-does-not-fit")
    plan.get_by_test_id("plan-apply").click()
    page.wait_for_function("() => document.querySelector('[data-testid=yaml-editor]').value.includes('qtype: qfloat8')")
    plan.locator("[data-testid=plan-verdict][data-fits=true]").wait_for(timeout=60_000)
    page.get_by_test_id("plan-budget").fill("")  # back to automatic (the budget is kept in the browser)
    plan.get_by_test_id("plan-verdict").filter(has_text="fits in 24.0 GB").wait_for(timeout=60_000)
    page.get_by_test_id("save-job").click()
    page.get_by_role("heading", name=re.compile("imported_lora")).wait_for()
    page.get_by_test_id("memory-plan").locator("[data-testid=plan-verdict][data-fits=true]").wait_for(timeout=60_000)

    # --- settings: the HF token is stored and never shown again (only its last characters)
    nav(page, "Settings")
    page.get_by_placeholder("hf_…").fill("hf_e2eTestToken0123456789")
    page.get_by_role("button", name="Save token").click()
    page.get_by_text("A token is set (…6789)").wait_for()
    assert "hf_e2eTestToken" not in page.content()
    shot(page, "17-settings")
    page.get_by_role("button", name="Remove token").click()
    page.get_by_text("No token set.").wait_for()

    # --- the dashboard's GPU cards, with GPU figures added to the server's answer (no GPU here)
    def with_gpus(route: Any) -> None:
        answer = route.fetch().json()
        answer["system"]["gpus"] = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "utilization": 87,
                                     "memory_used": 61 << 30, "memory_total": 80 << 30, "temperature": 64}]
        route.fulfill(json=answer)

    page.route("**/api/system", with_gpus)
    nav(page, "Dashboard")
    page.get_by_text("NVIDIA H100 80GB HBM3").wait_for()
    shot(page, "18-dashboard-gpu")
    page.unroute("**/api/system")

    # --- a two-expert run's metrics (the "Video training" preset, metrics written here, not trained):
    # per-expert loss and trend, the stability band of each expert's phases, transitions marked
    preset = server.api("GET", "/api/presets/video_training").json()["job"]
    preset["config"]["process"][0]["datasets"][0]["folder_path"] = dataset_folder
    created = server.api("POST", "/api/jobs", json={"config": preset, "name": "video_demo"})
    assert created.status_code == 201, created.text
    video_id = created.json()["job"]["id"]
    write_expert_metrics(server.root / "output" / "video_demo" / "metrics_video_demo.jsonl", steps=3000)
    page.goto(f"{server.url}/jobs/{video_id}?tab=metrics")
    loss_chart = page.get_by_test_id("chart-loss")
    loss_chart.get_by_role("button", name="loss high_noise").wait_for()
    loss_chart.get_by_role("button", name="trend low_noise").wait_for()
    wait_count(page, "[data-testid=chart-stability] .band rect", 4)  # 2 experts x 2 phases with a target
    assert "high_noise: foundation → balance" in page.get_by_test_id("chart-alpha").text_content()
    assert page.get_by_test_id("metric-cards").count() == 2  # one per expert
    shot(page, "19-metrics-experts")

    nav(page, "Jobs")
    rows = page.get_by_test_id("jobs-table").locator("tbody tr")
    rows.first.wait_for()
    assert rows.count() == 5
    shot(page, "20-jobs")
    assert not errors, errors
    context.close()
    print(f"e2e: {time.monotonic() - started:.1f} s in the browser")


def test_a_failed_run_shows_its_reason_message_and_fix(server: Server, browser: Any) -> None:
    """A job whose dataset folder is gone by the time it runs: the job list and the job page say
    the reason (Dataset), the run's own message naming the folder, and the fix."""
    gone = server.root / "datasets" / "deleted_meanwhile"
    job = {"job": "extension", "config": {"name": "e2e_failed", "process": [{
        "type": "sd_trainer", "training_folder": str(server.root / "output"), "device": "cpu",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "datasets": [{"folder_path": str(gone), "resolution": [64]}],
        "train": {"steps": 4, "batch_size": 1}, "model": {"name_or_path": str(server.model)},
    }]}}
    created = server.api("POST", "/api/jobs", json={"config": job, "start": True})
    assert created.status_code == 201, created.text
    job_id = created.json()["job"]["id"]
    deadline = time.monotonic() + 120
    while (state := job_status(server, job_id))["status"] != "error":
        assert time.monotonic() < deadline and state["status"] in ("queued", "running"), state
        time.sleep(0.3)
    assert state["reason"] == "data" and str(gone) in state["message"], state

    context, page, errors = signed_in_page(browser, server.url + "/jobs")
    summary = page.locator("[data-testid=jobs-table] tr[data-job=e2e_failed] [data-testid=failure-summary]")
    summary.wait_for()
    assert summary.text_content().startswith("Dataset: ") and "Fix: check the dataset folders" in summary.text_content()
    page.goto(f"{server.url}/jobs/{job_id}")
    box = page.locator("[data-testid=failure][data-reason=data]")
    box.wait_for()
    text = box.text_content()
    assert "Failed: Dataset" in text and "exit code 3" in text and str(gone) in text
    assert "Fix: check the dataset folders" in text
    shot(page, "21-failed-job")
    assert not errors, errors
    context.close()


@pytest.fixture(scope="module")
def tiny_florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aitk.caption.tiny import build_tiny_florence2

    return build_tiny_florence2(tmp_path_factory.mktemp("caption-model") / "florence2")


def test_caption_a_dataset_from_its_page(server: Server, browser: Any, tiny_florence: Path) -> None:
    """The dataset page's Caption action with a tiny Florence-2: the task's progress reaches done,
    and the new captions show in the caption editors (a caption typed before is kept)."""
    assert server.api("POST", "/api/datasets", json={"name": "to_caption"}).status_code == 201
    names = ["a_circle.png", "b_square.png", "c_circle.png"]
    files = [("files", (name, png((60 * i, 90, 200), name[2:-4]), "image/png")) for i, name in enumerate(names)]
    uploaded = server.api("POST", "/api/datasets/to_caption/upload", files=files,
                          data={"captions": '{"a_circle.png": "typed by hand"}'})
    assert uploaded.status_code == 201, uploaded.text

    context, page, errors = signed_in_page(browser, server.url + "/datasets/to_caption")
    page.get_by_test_id("dataset-page").wait_for()
    page.get_by_test_id("caption-dataset").click()  # opens the options
    page.get_by_test_id("caption-model").select_option("custom")
    page.get_by_test_id("caption-model-id").fill(str(tiny_florence))
    page.locator("#caption-prefix").fill("shp")
    page.locator("#caption-max").fill("5")
    shot(page, "30-caption-options")
    page.get_by_test_id("caption-dataset").click()  # starts
    progress = page.get_by_test_id("caption-progress")
    progress.wait_for()
    page.locator("[data-testid=caption-progress][data-state=completed]").wait_for(timeout=120_000)
    assert progress.get_attribute("data-done") == "2" and progress.get_attribute("data-total") == "2"
    assert "captioned 2 of 3 files, 1 already had a caption" in page.get_by_test_id("caption-outcome").text_content()
    for name in names[1:]:  # the editors show the new captions, to edit and save there
        editor = page.locator(f"[data-item='{name}']").get_by_test_id("caption")
        page.wait_for_function("(e) => e.value.startsWith('shp ')", arg=editor.element_handle())
    assert page.locator("[data-item='a_circle.png']").get_by_test_id("caption").input_value() == "typed by hand"
    card = page.locator("[data-item='b_square.png']")
    card.get_by_test_id("caption").fill("shp a blue square")
    card.get_by_test_id("save-caption").click()
    card.get_by_test_id("caption-state").filter(has_text="saved").wait_for()
    assert server.api("GET", "/api/datasets/to_caption/items/b_square.png/caption").json()["caption"] == "shp a blue square"
    shot(page, "31-captioned")
    assert not errors, errors
    context.close()


def test_quick_train_captions_the_picked_images(server: Server, browser: Any, tiny_florence: Path) -> None:
    """Quick train's Caption: the picked files go to a caption task; the captions fill the empty boxes."""
    context, page, errors = signed_in_page(browser, server.url + "/quick-train")
    page.get_by_role("heading", name="Quick train").wait_for()
    page.get_by_test_id("file-input").set_input_files(
        [{"name": f"qt_{i}.png", "mimeType": "image/png", "buffer": png((90, 40 * i, 60), "circle")} for i in range(3)])
    boxes = page.get_by_test_id("qt-caption-text")
    wait_count(page, "[data-testid=qt-caption-text]", 3)
    boxes.nth(0).fill("my own words")
    page.get_by_test_id("qt-caption").click()
    page.get_by_test_id("caption-model").select_option("custom")
    page.get_by_test_id("caption-model-id").fill(str(tiny_florence))
    page.locator("#caption-max").fill("4")
    page.get_by_test_id("qt-caption").click()
    page.locator("[data-testid=caption-progress][data-state=completed]").wait_for(timeout=120_000)
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=qt-caption-text]')].every((e) => e.value)")
    assert boxes.nth(0).input_value() == "my own words"
    assert all(boxes.nth(i).input_value() for i in (1, 2))
    shot(page, "32-quick-train-captions")
    assert not errors, errors
    context.close()


# ------------------------------------------------------------------ the model cache and publishing
@dataclass
class OnlineServer:
    """`aitk ui` online against the local hub of tests/hub_server.py, with its own HF_HOME."""

    server: Server
    hub: Any
    hf_home: Path


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory, tiny_sd15: Path) -> Iterator[OnlineServer]:
    from http.server import ThreadingHTTPServer
    import threading

    from hub_server import FakeHub, _handler

    if not DIST_INDEX.is_file():
        missing("the web app is not built (ui/dist/index.html); run `make ui`")
    hub = FakeHub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{httpd.server_port}"
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    root = tmp_path_factory.mktemp("e2e-online")
    port = free_port()
    log = ARTIFACTS / "server-online.log"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, AI_TOOLKIT_AUTH=TOKEN, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url,
               HF_HOME=str(root / "hf-home"), NO_PROXY="127.0.0.1,localhost", OMP_NUM_THREADS="1")
    for name in ("AITK_DATABASE_URL", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                 "HF_TOKEN_PATH"):
        env.pop(name, None)
    try:
        with running_ui(root, port, env, log, cwd=root) as process:
            server = Server(f"http://127.0.0.1:{port}", root, tiny_sd15, process, log)
            yield OnlineServer(server, hub, root / "hf-home")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_settings_show_the_model_cache_and_a_finished_job_publishes(online: OnlineServer, browser: Any) -> None:
    """Settings: the hub cache's place and size; a model id fetched from there (progress to done, the
    size then equal to the blobs on disk, the model listed). A job's page: Fetch models. A finished
    job's "Publish to the Hub": its LoRA reaches the hub, the page links the repo."""
    from test_model_cache import PIPE_FETCHED, pipe_files

    server, hub = online.server, online.hub
    files = pipe_files()
    hub.add_repo("tester/e2e-pipe", files)
    data = server.root / "datasets" / "shapes"
    data.mkdir(parents=True)
    for i, (colour, shape) in enumerate([((220, 40, 40), "circle"), ((40, 80, 220), "square")]):
        (data / f"img{i}.png").write_bytes(png(colour, shape))
        (data / f"img{i}.txt").write_text(f"a {shape}")

    def job(name: str, model: str, start: bool, save: dict[str, Any] | None = None) -> int:
        config = {"job": "extension", "config": {"name": name, "process": [{
            "type": "sd_trainer", "training_folder": str(server.root / "output"), "device": "cpu", "training_seed": 3,
            "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
            "datasets": [{"folder_path": str(data), "resolution": [64]}],
            "train": {"steps": 2, "batch_size": 1, "dtype": "fp32"}, "save": {"dtype": "float32", **(save or {})},
            "model": {"name_or_path": model}}]}}
        created = server.api("POST", "/api/jobs", json={"config": config, "start": start})
        assert created.status_code == 201, created.text
        return created.json()["job"]["id"]

    finished = job("e2e_publish", str(server.model), True, {"hf_repo_id": "tester/e2e-lora"})  # trains meanwhile
    context, page, errors = signed_in_page(browser, server.url + "/settings")
    size = page.get_by_test_id("cache-size")
    size.wait_for()
    assert size.get_attribute("data-bytes") == "0"
    assert page.get_by_test_id("cache-path").inner_text() == str(online.hf_home / "hub")
    page.get_by_test_id("fetch-model-id").fill("tester/e2e-pipe")
    page.get_by_test_id("fetch-model").click()
    page.locator("[data-testid=fetch-progress][data-state=completed]").wait_for(timeout=60_000)
    progress = page.get_by_test_id("fetch-progress")
    total = sum(len(files[p]) for p in PIPE_FETCHED)
    assert progress.get_attribute("data-done") == progress.get_attribute("data-total") == str(total)
    blobs = sum(p.stat().st_size for p in (online.hf_home / "hub").glob("models--*/blobs/*"))
    page.locator(f"[data-testid=cache-size][data-bytes='{blobs}']").wait_for()
    row = page.locator("[data-testid=cached-models] tr[data-repo='tester/e2e-pipe']")
    row.wait_for()
    assert row.get_attribute("data-bytes") == str(blobs) and "just now" in row.inner_text()
    shot(page, "40-settings-model-cache")

    # a job's page: Fetch models downloads what the job names (here: all cached already)
    waiting = job("e2e_fetch", "tester/e2e-pipe", False)
    page.goto(f"{server.url}/jobs/{waiting}")
    page.get_by_test_id("fetch-job-models").click()
    outcome = page.locator("[data-testid=fetch-job] [data-testid=fetch-progress][data-state=completed]")
    outcome.wait_for(timeout=60_000)
    assert "already in the cache" in outcome.inner_text()

    # the finished job: Publish to the Hub with the token of the settings page
    deadline = time.monotonic() + 180
    while (state := job_status(server, finished))["status"] != "completed":
        assert time.monotonic() < deadline and state["status"] in ("queued", "running"), state
        time.sleep(0.5)
    assert server.api("PUT", "/api/settings", json={"hf_token": "hf_e2ePublishToken0123"}).status_code == 200
    page.goto(f"{server.url}/jobs/{finished}")
    assert page.get_by_test_id("publish-repo").input_value() == "tester/e2e-lora"
    assert page.get_by_test_id("publish-private").is_checked()
    page.get_by_test_id("publish-private").uncheck()
    page.get_by_test_id("publish-job").click()
    page.locator("[data-testid=publish-state][data-state=uploaded]").wait_for(timeout=60_000)
    assert page.get_by_test_id("publish-url").get_attribute("href") == f"{hub.url}/tester/e2e-lora"
    lora = server.root / "output" / "e2e_publish" / "e2e_publish.safetensors"
    assert hub.files["tester/e2e-lora"]["e2e_publish.safetensors"] == lora.read_bytes()
    assert hub.repos["tester/e2e-lora"]["visibility"] == "public"
    uploads = {r.headers.get("authorization") for r in hub.requests if r.method == "POST"}
    assert uploads == {"Bearer hf_e2ePublishToken0123"}
    shot(page, "41-job-published")
    assert not errors, errors
    context.close()
