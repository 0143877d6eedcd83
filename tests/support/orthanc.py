"""A real Orthanc on loopback, as the PACS in front of the node or as the DICOMweb server for OHIF."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.common import ROOT, free_port, wait_for

LUA = ROOT / "deploy" / "orthanc" / "route-chest-radiographs.lua"


def orthanc_binary() -> str:
    # A CI dependency like DCMTK (tests/support/dcmtk.py): missing fails the test, it does not skip it.
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if found is None:
        pytest.fail("Orthanc not found: run .ci/run, which installs the orthanc package")
    return found


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian orthanc-dicomweb


class Orthanc:
    """A real Orthanc on loopback; with ``node_port`` it knows the node (C-MOVE destination
    CXRBMD) and routes chest films to it (the shipped Lua script) unless ``route`` is off, with
    ``dicomweb`` it serves DICOMweb at /dicom-web/ (for OHIF)."""

    def __init__(self, tmp_path: Path, node_port: int | None = None, dicomweb: bool = False, route: bool = True) -> None:
        self.http = free_port()
        self.dicom = free_port()
        folder = tmp_path / "orthanc"
        folder.mkdir()
        # The shipped example configuration, pointed at this test's ports and folders.
        config: dict[str, object] = {
            "Name": "PACS", "DicomAet": "ORTHANC", "DicomPort": self.dicom, "HttpPort": self.http,
            "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        }
        if node_port is not None:
            config["DicomModalities"] = {"cxrbmd": ["CXRBMD", "127.0.0.1", node_port]}
            if route:  # else the node only queries and retrieves (screener backfill)
                config["LuaScripts"] = [str(LUA)]
        if dicomweb:
            if not DICOMWEB_PLUGIN.is_file():
                pytest.fail(f"{DICOMWEB_PLUGIN} not found: run .ci/run, which installs orthanc-dicomweb")
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = (folder / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([orthanc_binary(), str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("Orthanc's REST API", self._up, 30)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"Orthanc exited with {self.proc.returncode}: {self.log.name}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as response:
            return json.loads(response.read())

    def raw(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as response:
            return response.read()

    def upload(self, path: Path) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}/instances", data=path.read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(json.loads(response.read())["ID"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()
