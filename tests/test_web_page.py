"""heartseg-web and its page: the server's contract, and the page in real headless Chromium.

The page segments the example scan (?scan=URL from a CORS server) to the volume and mask heartseg's Python API
gives with the same model file, downloads the mask as NIfTI on the scan's grid, and refuses bad files with an
'error: ' status. The model is $HEARTSEG_WEB_MODEL, by default the shipped model. The refusals and the server's
tests use a stand-in model with the same interface, since the page refuses those files before any model runs.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime import cli_web
from onnx_models import build_test_model

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "la_029_crop.nii.gz"
SCREENSHOT = REPO_ROOT / "docs" / "web-page.png"
MODEL = Path(os.environ.get("HEARTSEG_WEB_MODEL", REPO_ROOT / "models" / "heartseg-la.onnx"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PAGE_BUILT = (REPO_ROOT / "runtime" / cli_web.PAGE_FOLDER / "worker.js").is_file()
SERVER_START_S = 60
PAGE_TIMEOUT_S = 300
# Chromium without a display or GPU: WebGL (the viewer) through SwiftShader, and no traffic to Google's services.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--window-size=1400,860")

NOT_BUILT = "the web page is not built (cd web && npm ci --ignore-scripts && npm run build)"


def build_stand_in_model(path: Path) -> Path:
    """A tiny heartseg model file with the whole interface (a pointwise network in the graph from scan to mask, its
    contract and digest): what the server checks and serves."""
    return build_test_model(path)


def heartseg_web_command() -> list[str]:
    """heartseg-web from the test interpreter's environment."""
    script = Path(sys.executable).parent / "heartseg-web"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from heartseg.runtime.cli_web import main; main()"]


class WebServer:
    """A running heartseg-web --no-open --port 0 and its URL."""

    def __init__(self, model: Path, log: Path) -> None:
        self.log = log.open("w+")
        self.process = subprocess.Popen([*heartseg_web_command(), "--no-open", "--port", "0", "--model", str(model)],
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        line = self.process.stdout.readline()  # the first line names the URL once the port is bound
        if "serving http://" not in line:
            self.process.kill()
            self.process.wait(timeout=10)
            self.log.seek(0)
            error = self.log.read()
            self.stop()
            pytest.fail(f"heartseg-web did not start: {line}{error}")
        return line.split("serving ", 1)[1].split()[0]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class CorsHandler(SimpleHTTPRequestHandler):
    """Static files that any page may fetch (CORS), as a scan server for ?scan= must allow."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def module_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="heartseg-web-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def stand_in_model(module_dir: Path) -> Path:
    return build_stand_in_model(module_dir / "stand_in.onnx")


@pytest.fixture(scope="module")
def stand_in_server(stand_in_model: Path, module_dir: Path) -> Iterator[WebServer]:
    if not PAGE_BUILT:
        pytest.skip(NOT_BUILT)
    server = WebServer(stand_in_model, module_dir / "stand_in_server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scans(module_dir: Path) -> Iterator[tuple[Path, str]]:
    """A folder of files served with CORS, and its URL."""
    folder = module_dir / "scans"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CorsHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(module_dir: Path) -> Iterator[object]:
    """Headless Chromium through chromedriver; downloads go to module_dir/downloads."""
    if not PAGE_BUILT:
        pytest.skip(NOT_BUILT)
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    if CHROMEDRIVER is None:
        pytest.skip("chromedriver is not installed (Debian: apt-get install chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={module_dir / 'profile'}"):
        options.add_argument(flag)
    downloads = module_dir / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """(status, headers (names in any case), body) of a GET, errors included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def raw_get(url: str, target: str) -> int:
    """The status of a GET of target sent as it is (urllib would normalise '..' away)."""
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def open_page(driver, url: str) -> str:
    """Load the page and wait for its status to settle on 'done' or 'error: ...'; returns the status."""
    driver.get(url)
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    status = ""
    while time.monotonic() < deadline:
        status = driver.find_element("id", "status").text
        if status == "done" or status.startswith("error: "):
            return status
        time.sleep(0.25)
    pytest.fail(f"the page did not finish in {PAGE_TIMEOUT_S} s; its status: {status!r}")


def scan_url(page: str, scan: str) -> str:
    return f"{page}?scan={urllib.request.quote(scan, safe=':/')}"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


# ---- the server ----


def test_server_headers_types_and_model(stand_in_server: WebServer, stand_in_model: Path) -> None:
    """Cross-origin isolation headers on every file, the types browsers insist on, the model at /model.onnx."""
    for path, mime in [("", "text/html"), ("app.js", "text/javascript"), ("worker.js", "text/javascript"),
                       ("ort/ort.wasm.min.mjs", "text/javascript"), ("ort/ort-wasm-simd-threaded.wasm",
                                                                      "application/wasm")]:
        status, headers, _ = http_get(stand_in_server.url + path)
        assert status == 200, path
        assert headers["Content-Type"].split(";")[0] == mime, path
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin", path
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp", path
    status, headers, body = http_get(stand_in_server.url + "model.onnx")
    assert status == 200 and body == stand_in_model.read_bytes()
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"


@pytest.mark.parametrize("target", ["/../pyproject.toml", "/%2e%2e/%2e%2e/pyproject.toml", "/ort/../../cli_web.py",
                                    "/..%2f..%2fpyproject.toml", "//etc/passwd", "/ort/", "/missing.js"])
def test_server_serves_nothing_outside_its_folder(stand_in_server: WebServer, target: str) -> None:
    """Paths that climb out of the page's folder, folder listings and unknown files: 404."""
    assert raw_get(stand_in_server.url, target) == 404


def test_server_follows_no_link_out_of_its_folder(stand_in_model: Path, tmp_path: Path) -> None:
    """A symbolic link in the page's folder to a file outside it is not followed."""
    page = tmp_path / "page"
    page.mkdir()
    (page / "index.html").write_text("<p>page</p>\n")
    (tmp_path / "private.txt").write_text("private\n")
    (page / "leak.txt").symlink_to(tmp_path / "private.txt")
    server = cli_web.make_server(cli_web.WebConfig(page=page, model=stand_in_model, port=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert http_get(url)[0] == 200
        assert http_get(url + "leak.txt")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_server_refuses_other_hosts(stand_in_server: WebServer) -> None:
    """A request naming another host (a page that rebinds its name to 127.0.0.1) is refused."""
    status, _, _ = http_get(stand_in_server.url + "model.onnx", {"Host": "attacker.example:80"})
    assert status == 403


def test_port_in_use_exits_2(stand_in_server: WebServer, stand_in_model: Path) -> None:
    port = stand_in_server.url.rstrip("/").rsplit(":", 1)[1]
    done = subprocess.run([*heartseg_web_command(), "--no-open", "--port", port, "--model", str(stand_in_model)],
                          capture_output=True, text=True, timeout=SERVER_START_S)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --port {port}: the port is in use"), done.stderr


@pytest.mark.parametrize("case", ["missing", "not-onnx", "per-stage", "altered"])
def test_bad_model_exits_2(case: str, tmp_path: Path) -> None:
    """A missing file, a file that is not ONNX, the per-stage model file, and a model whose weights changed after
    export (heartseg-infer refuses it too): one error line, exit 2."""
    onnx = pytest.importorskip("onnx", reason="onnx is needed to build the test model (pip install onnx)")
    path = tmp_path / "model.onnx"
    if case == "not-onnx":
        path.write_text("not a model\n" * 20)
    elif case == "per-stage":
        helper, TensorProto = onnx.helper, onnx.TensorProto
        info = helper.make_tensor_value_info
        graph = helper.make_graph([helper.make_node("Identity", ["fine_image"], ["fine_prob"])], "per_stage",
                                  [info("fine_image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
                                  [info("fine_prob", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])])
        onnx.save(helper.make_model(graph), str(path))
    elif case == "altered":
        proto = onnx.load(str(build_test_model(tmp_path / "exported.onnx", bias=-1.0)))
        for tensor in proto.graph.initializer:
            if tensor.name == "bias":
                tensor.CopyFrom(onnx.numpy_helper.from_array(np.asarray(-3.0, np.float32), "bias"))
        onnx.save(proto, str(path))
    expected = {"missing": "model file not found", "not-onnx": "not an ONNX model",
                "per-stage": "not the end-to-end heartseg model", "altered": "altered or damaged"}[case]
    done = subprocess.run([*heartseg_web_command(), "--no-open", "--port", "0", "--model", str(path)],
                          capture_output=True, text=True, timeout=SERVER_START_S)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr
    assert "serving" not in done.stdout


def test_page_not_built_exits_2(run_cli, stand_in_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the built page: one error line that says how to build it, exit 2."""
    monkeypatch.setattr(cli_web, "PAGE_FOLDER", "no_such_page_folder")
    result = run_cli(cli_web.app, "--no-open", "--port", 0, "--model", stand_in_model)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "the web page is not built" in lines[0] and "npm run build" in lines[0], result.output


def test_help_says_what_it_serves(run_cli) -> None:
    result = run_cli(cli_web.app, "--help")
    text = " ".join(result.stdout.split())
    assert result.exit_code == 0
    for words in ("127.0.0.1", "/model.onnx", "?scan=URL", "--no-open", "--port", "npm run build"):
        assert words in text, words


# ---- the page in Chromium ----


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files the page must refuse, each with words its status must hold."""
    affine = np.diag([1.25, 1.25, 1.37, 1.0])
    noise = np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32)
    text = folder / "notes.nii.gz"
    text.write_text("these are not voxels\n")
    series, flat, huge = folder / "series.nii.gz", folder / "slice.nii.gz", folder / "huge.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([noise, noise], axis=3), affine), str(series))
    nib.save(nib.Nifti1Image(noise[:, :, 0], affine), str(flat))
    # 144 million voxels of zeros: 0.14 MB gzipped, 144 MB as uint8, more than the page takes.
    nib.save(nib.Nifti1Image(np.zeros((600, 600, 400), np.uint8), affine), str(huge))
    return {"not-nifti": (text, "not a NIfTI"), "4-D": (series, "4-D"), "2-D": (flat, "2-D"),
            "too-large": (huge, "at most 67 million voxels")}


@pytest.fixture(scope="module")
def bad_files(scans: tuple[Path, str]) -> dict[str, tuple[Path, str]]:
    return _bad_files(scans[0])


@pytest.mark.parametrize("case", ["not-nifti", "4-D", "2-D", "too-large"])
def test_page_refuses_bad_files(case: str, browser, stand_in_server: WebServer, scans: tuple[Path, str],
                                bad_files: dict[str, tuple[Path, str]]) -> None:
    """Not one 3-D NIfTI volume, or too large for the tab: 'error: ' and why, and the tab still responsive."""
    path, words = bad_files[case]
    status = open_page(browser, scan_url(stand_in_server.url, scans[1] + path.name))
    assert status.startswith("error: ") and words in status, status
    assert browser.find_element("id", "volume-ml").text == ""
    assert browser.find_element("id", "download").get_attribute("disabled") is not None
    started = time.monotonic()
    assert browser.execute_script("return 6 * 7") == 42
    assert time.monotonic() - started < 5


def test_page_refuses_a_picked_file_not_named_nifti(browser, stand_in_server: WebServer, tmp_path: Path) -> None:
    """The file picker: a file that is not .nii or .nii.gz is refused by name."""
    picked = tmp_path / "report.pdf"
    picked.write_bytes(b"%PDF-1.4\n")
    browser.get(stand_in_server.url)
    browser.find_element("id", "file").send_keys(str(picked))
    deadline = time.monotonic() + 60
    while not browser.find_element("id", "status").text.startswith("error: ") and time.monotonic() < deadline:
        time.sleep(0.2)
    status = browser.find_element("id", "status").text
    assert status == "error: report.pdf: not a NIfTI file (expected .nii or .nii.gz)", status


def end_to_end_model() -> Path:
    """$HEARTSEG_WEB_MODEL or the shipped model, which must be one graph from scan to mask."""
    inputs, _ = cli_web.graph_io_names(MODEL.read_bytes())
    assert "image" in inputs, f"{MODEL}: not one graph from scan to mask (no input 'image')"
    return MODEL


@pytest.mark.slow
def test_page_segments_example_like_python(browser, scans: tuple[Path, str], module_dir: Path) -> None:
    """The page's volume within 1 % of the Python API's, its downloaded mask at Dice >= 0.99 on the scan's grid."""
    from heartseg.runtime.segmenter import Segmenter

    model = end_to_end_model()
    expected = Segmenter(model, device="cpu").predict(str(EXAMPLE))
    folder, base = scans
    shutil.copy(EXAMPLE, folder / EXAMPLE.name)
    server = WebServer(model, module_dir / "server.log")
    try:
        status = open_page(browser, scan_url(server.url, base + EXAMPLE.name))
        assert status == "done", status
        volume = float(browser.find_element("id", "volume-ml").text)
        seconds = float(browser.find_element("id", "seconds").text)
        assert volume == pytest.approx(expected.volume_ml, rel=0.01)
        assert seconds > 0
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
        downloads = module_dir / "downloads"
        browser.find_element("id", "download").click()
        saved = downloads / "la_029_crop_mask.nii.gz"
        deadline = time.monotonic() + 30
        while not saved.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert saved.is_file(), sorted(p.name for p in downloads.iterdir())
    finally:
        server.stop()
    mask, scan = nib.load(str(saved)), nib.load(str(EXAMPLE))
    assert mask.get_data_dtype() == np.uint8
    assert mask.shape == scan.shape and np.array_equal(mask.affine, scan.affine)
    found = np.asarray(mask.dataobj)
    assert dice(found, expected.mask_array) >= 0.99
    assert float(np.count_nonzero(found)) * abs(np.linalg.det(scan.affine[:3, :3])) / 1000 == pytest.approx(volume,
                                                                                                           abs=0.01)
