"""Seconds in the browser tab: heartseg-web's page in headless Chromium, each scan opened through ?scan=URL.

Needs the built page (cd web && npm ci --ignore-scripts && npm run build), Debian's chromium and chromium-driver,
and selenium. Prints one JSON line per scan and run: the page's own timings (`window.heartseg`: the model's
download and session start, then reading, segmenting and writing the scan) and the wall time to `done`.

    python benchmarks/web_page.py [--model M.onnx] [--repeat 3] SCAN...
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_web_page import CHROMIUM_FLAGS, CorsHandler, WebServer  # noqa: E402


def main() -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="+", type=Path)
    parser.add_argument("--model", type=Path, default=Path(__file__).parents[1] / "models" / "heartseg-la.onnx")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a scan may take before the run stops")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="heartseg-web-bench-"))
    folder = tmp / "scans"
    folder.mkdir()
    for scan in args.scans:
        shutil.copy(scan, folder / scan.name)
    # The scans come from a second local server that allows the page with CORS, as a PACS or viewer would.
    cors = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CorsHandler, directory=str(folder)))
    threading.Thread(target=cors.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{cors.server_address[1]}/"
    server = WebServer(args.model, tmp / "server.log")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        for run in range(args.repeat):
            for scan in args.scans:
                start = time.monotonic()
                driver.get(f"{server.url}?scan={base}{scan.name}")
                while (status := driver.find_element("id", "status").text) != "done" and not status.startswith("error"):
                    if time.monotonic() - start > args.timeout:
                        raise SystemExit(f"{scan.name}: no result after {args.timeout:.0f} s (status: {status!r})")
                    time.sleep(0.1)
                timings = json.loads(driver.execute_script("return JSON.stringify(window.heartseg)"))
                print(json.dumps({"run": run + 1, "file": scan.name, "status": status,
                                  "wall_to_done_s": round(time.monotonic() - start, 3), **timings}), flush=True)
    finally:
        driver.quit()
        server.stop()
        cors.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
