"""heartseg-web: serve the heartseg page, which segments scans inside the browser tab, on this computer only.

The page (built from web/page/ into runtime/web_page/) runs the end-to-end model, one ONNX graph from scan to mask,
with ONNX Runtime Web; this server only hands out the page's files and the model file at /model.onnx. It listens on
127.0.0.1 and sends the headers that make the page cross-origin isolated, which WebAssembly threads need.
"""

from __future__ import annotations

import errno
import functools
import os
import webbrowser
from dataclasses import dataclass
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import typer

from .cli_common import guarded, new_app, say, version_option
from .contract import PIPELINE_INPUTS, PIPELINE_OUTPUTS
from .errors import InputError, ModelError
from .model_digest import GRAPH_FIELD, LENGTH_DELIMITED, DigestError, _fields, scan_model
from .segmenter import VARIANTS, resolve_model
from .session import read_contract

HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MODEL_URL_PATH = "/model.onnx"
PAGE_FOLDER = "web_page"
BUILD_COMMAND = "cd web && npm ci --ignore-scripts && npm run build"
# What the page feeds and reads (the model file's whole interface: contract.PIPELINE_INPUTS and _OUTPUTS).
MODEL_INPUTS = PIPELINE_INPUTS
MODEL_OUTPUTS = PIPELINE_OUTPUTS[:3]
GRAPH_INPUT_FIELD, GRAPH_OUTPUT_FIELD, VALUE_INFO_NAME_FIELD = 11, 12, 1

# What the page's files are; the browser runs module scripts and compiles WebAssembly only with the right types.
MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
# Cross-origin isolation (SharedArrayBuffer, so WebAssembly threads); the rest keeps the files to this page.
RESPONSE_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

HELP = (
    "Serve the heartseg web page on this computer (http://127.0.0.1:PORT/ only) and open it in the browser. "
    "The page segments a NIfTI scan (.nii, .nii.gz) inside the browser tab with the end-to-end model (one ONNX graph "
    "from scan to mask) and ONNX Runtime Web: drop or choose a scan, or open /?scan=URL (the server of URL must allow "
    "the page with CORS). It shows the scan with the mask, the left atrium's volume, the QC score and the time, and "
    "downloads the mask as NIfTI. The scan never leaves the browser; this server only hands out the page and the "
    "model file (at /model.onnx). The page is built from web/page/ in heartseg's source folder: "
    f"{BUILD_COMMAND}. Stop it with Ctrl+C. "
    "Exit codes: 0 stopped with Ctrl+C; 2 the page is not built, the model is missing or not the end-to-end model, "
    "or the port is in use."
)


@dataclass(frozen=True)
class WebConfig:
    """What the server hands out and where it listens."""

    page: Path
    model: Path
    port: int = DEFAULT_PORT
    host: str = HOST


def page_folder() -> Path:
    """The built page's folder; InputError when the page has not been built."""
    folder = Path(str(resources.files("heartseg.runtime").joinpath(PAGE_FOLDER)))
    if not (folder / "index.html").is_file() or not (folder / "worker.js").is_file():
        raise InputError(f"the web page is not built ({folder} has no index.html and worker.js): build it in "
                         f"heartseg's source folder with: {BUILD_COMMAND}")
    return folder


def graph_io_names(data: bytes) -> tuple[list[str], list[str]]:
    """The names of an ONNX model's graph inputs and outputs, read from its bytes without onnx or ONNX Runtime."""
    view = memoryview(data)
    inputs: list[str] = []
    outputs: list[str] = []
    for number, wire, _, payload, end in _fields(view, 0, len(view)):
        if number != GRAPH_FIELD or wire != LENGTH_DELIMITED:
            continue
        for field, kind, _, start, stop in _fields(view, payload, end):
            if kind != LENGTH_DELIMITED or field not in (GRAPH_INPUT_FIELD, GRAPH_OUTPUT_FIELD):
                continue
            names = [bytes(view[p:q]).decode("utf-8", "replace") for n, w, _, p, q in _fields(view, start, stop)
                     if n == VALUE_INFO_NAME_FIELD and w == LENGTH_DELIMITED]
            (inputs if field == GRAPH_INPUT_FIELD else outputs).extend(names[:1])
    return inputs, outputs


def check_end_to_end_model(path: Path) -> int:
    """The model file's size in bytes; ModelError unless it is one ONNX file with the end-to-end interface."""
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not a model file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    try:
        model = scan_model(data)
        inputs, outputs = graph_io_names(data)
    except DigestError as exc:
        raise ModelError(f"{path}: not an ONNX model ({exc})") from None
    if model.external_tensors:
        raise ModelError(f"{path}: keeps weights in external data files, which a browser cannot load: give a model "
                         "stored as one file")
    if any(name not in inputs for name in MODEL_INPUTS) or any(name not in outputs for name in MODEL_OUTPUTS):
        raise ModelError(f"{path}: not the end-to-end heartseg model the page runs: it needs inputs "
                         f"{', '.join(MODEL_INPUTS)} and outputs {', '.join(MODEL_OUTPUTS)}, and has inputs "
                         f"{', '.join(inputs) or 'none'} and outputs {', '.join(outputs) or 'none'} (a file of the "
                         "stages' networks: write the end-to-end file with "
                         "heartseg-export --upgrade OLD.onnx NEW.onnx)")
    # The checks heartseg-infer makes when it opens a model: its contract, and its weights against their digest.
    read_contract(path)
    return len(data)


class PageHandler(SimpleHTTPRequestHandler):
    """Hands out the page's files and the model, GET and HEAD only, nothing outside the page's folder."""

    extensions_map = MIME_TYPES
    server_version = "heartseg-web"
    sys_version = ""

    def __init__(self, *args: Any, config: WebConfig, **kwargs: Any) -> None:
        self.config = config
        super().__init__(*args, directory=str(config.page), **kwargs)

    def translate_path(self, path: str) -> str:
        """The file for a URL path: the model at MODEL_URL_PATH, else a file inside the page's folder (or none)."""
        if urlsplit(path).path == MODEL_URL_PATH:
            return str(self.config.model)
        local = Path(super().translate_path(path)).resolve()
        root = self.config.page.resolve()
        # translate_path drops '..' segments; this also keeps symbolic links from leading out of the folder.
        return str(local) if local == root or root in local.parents else str(root / "missing")

    def list_directory(self, path: str | os.PathLike) -> None:
        """No folder listings: a folder without index.html is not found."""
        self.send_error(HTTPStatus.NOT_FOUND, "File not found")
        return None

    def send_head(self) -> Any:
        """Refuse requests whose Host is not this server (a page elsewhere that renames itself to 127.0.0.1)."""
        if self.headers.get("Host", "") not in self.allowed_hosts():
            self.send_error(HTTPStatus.FORBIDDEN, "Unknown host")
            return None
        return super().send_head()

    def allowed_hosts(self) -> set[str]:
        """The Host headers a browser sends for this server."""
        port = self.server.server_address[1]
        return {f"{HOST}:{port}", f"localhost:{port}"}

    def end_headers(self) -> None:
        for name, value in RESPONSE_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Quiet: the page reports its own progress."""


def make_server(config: WebConfig) -> ThreadingHTTPServer:
    """A bound server for the config; InputError when the port is in use or may not be used."""
    handler = functools.partial(PageHandler, config=config)
    try:
        server = ThreadingHTTPServer((config.host, config.port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"--port {config.port}: the port is in use on {config.host}; choose another, or "
                             "--port 0 for any free port") from None
        raise InputError(f"--port {config.port}: cannot listen on {config.host} ({exc.strerror or exc})") from None
    server.daemon_threads = True
    return server


app = new_app()


@app.command(help=HELP)
@guarded
def web(
    port: int = typer.Option(DEFAULT_PORT, "--port", "-p", min=0, max=65535, metavar="P",
                             help="Port on 127.0.0.1 (0: any free port)."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", metavar="NAME|M.onnx",
        help="The end-to-end model file the page runs, or a shipped variant's name "
             f"({', '.join(VARIANTS)}). [default: fp32, the model shipped with the package]", show_default=False),
    no_open: bool = typer.Option(False, "--no-open", help="Do not open the page in the browser."),
    version: bool = version_option(),
) -> None:
    """Serve the page until Ctrl+C."""
    path = resolve_model(model).resolve()
    size = check_end_to_end_model(path)
    page = page_folder()
    server = make_server(WebConfig(page=page, model=path, port=port))
    url = f"http://{HOST}:{server.server_address[1]}/"
    say(f"heartseg-web: serving {url} (model {path}, {size / 2**20:.1f} MiB); press Ctrl+C to stop")
    if not no_open and not webbrowser.open(url):
        say(f"open {url} in a browser")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("heartseg-web: stopped")
    finally:
        server.server_close()


def main() -> None:
    """Entry point of heartseg-web."""
    app(prog_name="heartseg-web")
