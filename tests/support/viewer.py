"""The OHIF Viewer, served for real, and Chromium driven through it.

:class:`OhifServer` is the small web server a site puts in front of OHIF: it serves the
prebuilt viewer (npm ``@ohif/app`` dist/, installed by deploy/ohif/install.sh), our
deploy/ohif/app-config.js, and passes /dicom-web/ on to Orthanc on the same origin (no CORS).
:func:`open_study` runs tests/browser/ohif.mjs (puppeteer-core driving Debian's Chromium) and
returns what the page showed. Missing pieces fail the test with the command that installs
them: they are CI dependencies (.ci/run), like DCMTK and Orthanc.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.common import ROOT

BROWSER_DIR = ROOT / "tests" / "browser"
APP_CONFIG = ROOT / "deploy" / "ohif" / "app-config.js"
OHIF_VERSION = "3.13.2"  # deploy/ohif/install.sh installs this one
TIMEOUT_S = 420


def ohif_dist() -> Path:
    dist = Path(os.environ.get("SCREENER_OHIF_DIST") or Path.home() / ".cache" / "cxr-bmd-screener" / f"ohif-{OHIF_VERSION}")
    if not (dist / "index.html").is_file():
        pytest.fail(f"OHIF viewer not found in {dist}: run .ci/run or deploy/ohif/install.sh")
    return dist


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium not found: run .ci/run, which installs the Debian package chromium")
    return found


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node not found: run .ci/run, which installs nodejs")
    if not (BROWSER_DIR / "node_modules" / "puppeteer-core").is_dir():
        pytest.fail("puppeteer-core not installed: run .ci/run or `npm ci --prefix tests/browser`")
    return found


class _Handler(http.server.SimpleHTTPRequestHandler):
    dist: Path
    orthanc: str

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, directory=str(self.dist), **kwargs)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/dicom-web/"):
            self._proxy()
            return
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            self._send(200, "application/javascript", APP_CONFIG.read_bytes())
            return
        if not (self.dist / path.lstrip("/")).is_file():
            self.path = "/index.html"  # the viewer's own routes (/viewer?StudyInstanceUIDs=...)
        super().do_GET()

    def _proxy(self) -> None:
        # Host is passed on so that Orthanc's BulkDataURIs point back through this server.
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "host")}
        request = urllib.request.Request(self.orthanc + self.path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                self._send(response.status, response.headers.get("Content-Type", ""), response.read())
        except urllib.error.HTTPError as error:
            self._send(error.code, error.headers.get("Content-Type", "text/plain"), error.read())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class OhifServer:
    """OHIF at http://127.0.0.1:<port>/, DICOMweb passed on to Orthanc's HTTP port."""

    def __init__(self, orthanc_http_port: int) -> None:
        handler = type("Handler", (_Handler,), {"dist": ohif_dist(), "orthanc": f"http://127.0.0.1:{orthanc_http_port}"})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()

    def study_url(self, study_uid: str) -> str:
        return f"http://127.0.0.1:{self.port}/viewer?StudyInstanceUIDs={study_uid}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def open_study(url: str, steps: list[dict[str, str]], out_dir: Path) -> dict:
    """Open ``url`` in Chromium, load each step's series into the viewport, screenshot it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"url": url, "chromium": chromium(), "out_dir": str(out_dir), "width": 1920, "height": 1080,
            "steps": steps}
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([node(), str(BROWSER_DIR / "ohif.mjs"), str(spec_path)], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=BROWSER_DIR)
    if proc.returncode != 0:
        pytest.fail(f"the browser run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result
