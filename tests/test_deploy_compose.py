"""The site stack (deploy/compose/): compose.yaml wires Orthanc, the node, OHIF behind nginx and
(profile multi-node) PostgreSQL; every file it mounts is in the repository; the node's
configuration loads with the node's own loader and agrees with Orthanc's, with the routing
script's and with nginx's. No containers are started: the files are read."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from screener.config import load_config
from tests.support.common import ROOT

COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
LUA = ROOT / "deploy" / "orthanc" / "route-chest-radiographs.lua"
NODE_CONFIG = "/etc/cxr-bmd-screener/screener.toml"


def compose() -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # a test dependency: missing fails the test, it does not skip it
        pytest.fail("PyYAML not installed: python3 -m pip install pyyaml (it belongs in the [dev] extra)")
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, with no variable set."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Each volume entry as {type, source, target, read_only}, short syntax expanded."""
    found = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            parts = interpolate(entry).split(":")
            source, target = parts[0], parts[1]
            mode = parts[2] if len(parts) > 2 else "rw"
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            found.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(",")})
        else:
            found.append({"type": entry["type"], "source": interpolate(entry.get("source", "")),
                          "target": entry["target"], "read_only": bool(entry.get("read_only"))})
    return found


def bind_source(mount: dict[str, Any]) -> Path:
    return (COMPOSE_DIR / mount["source"]).resolve()


def mount_at(service: dict[str, Any], target: str) -> dict[str, Any]:
    [found] = [m for m in mounts(service) if m["target"] == target]
    return found


def orthanc_json() -> dict[str, Any]:
    """deploy/compose/orthanc.json: JSON with Orthanc's // comment lines."""
    text = (COMPOSE_DIR / "orthanc.json").read_text()
    return json.loads("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//")))


def lua_constant(name: str) -> str:
    match = re.search(rf"^local {name} = '([^']*)'", LUA.read_text(), re.M)
    assert match, f"{name} not found in {LUA}"
    return match.group(1)


def test_the_stack_has_its_services_and_postgres_only_in_the_multi_node_profile() -> None:
    found = services()
    assert {"orthanc", "screener", "ohif", "postgres"} <= set(found)
    assert found["postgres"]["profiles"] == ["multi-node"]
    assert mount_at(found["postgres"], "/var/lib/postgresql/data")["type"] == "volume"
    # Everything a plain `compose up` starts has no profile; the multi-node extras all do.
    assert "profiles" not in found["orthanc"] and "profiles" not in found["screener"] and "profiles" not in found["ohif"]
    for name, service in found.items():
        if name not in ("orthanc", "screener", "ohif", "ohif-dist"):
            assert service.get("profiles") == ["multi-node"], name


def test_every_bind_mounted_file_is_in_the_repository_and_every_volume_is_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for mount in mounts(service):
            if mount["type"] == "bind":
                assert bind_source(mount).exists(), f"{name}: {mount['source']} (from deploy/compose/) is not in the repository"
                assert ROOT in bind_source(mount).parents, f"{name}: {mount['source']} is outside the repository"
                assert mount["read_only"], f"{name}: {mount['source']} should be mounted read-only"
            else:
                assert mount["source"] in declared, f"{name}: volume {mount['source']} is not declared"


def test_screener_service_builds_the_image_and_serves_dicom_with_a_health_check() -> None:
    screener = services()["screener"]
    build = screener["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == ROOT / "deploy" / "container" / "Containerfile"
    # The build argument is one the Containerfile declares, and its default is the Containerfile's.
    containerfile = ROOT / build["dockerfile"]
    assert containerfile.is_file(), f"{build['dockerfile']} not found: compose.yaml builds the node from it"
    declared = re.search(r"^ARG BASE_IMAGE=(\S+)", containerfile.read_text(), re.M)
    assert declared, f"{build['dockerfile']} declares no ARG BASE_IMAGE=default"
    assert interpolate(build["args"]["BASE_IMAGE"]) == declared.group(1)
    published = [str(p).split(":")[-1] for p in screener.get("ports", [])]
    assert "11112" in [str(p) for p in screener.get("expose", [])] + published
    data = mount_at(screener, "/data")
    assert data["type"] == "volume" and data["source"] == "screener-data" and not data["read_only"]
    config = mount_at(screener, NODE_CONFIG)
    assert config["type"] == "bind" and bind_source(config) == COMPOSE_DIR / "screener.toml"
    assert screener["command"][-2:] == ["--config", NODE_CONFIG]
    check = " ".join(screener["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/health" in check
    # Stopping: the node finishes the batch in hand, which takes longer than compose's 10 s.
    assert screener["stop_signal"] == "SIGTERM"
    assert int(str(screener["stop_grace_period"]).rstrip("s")) >= 60


def test_orthanc_mounts_the_shipped_routing_script_and_the_stack_configuration() -> None:
    orthanc = services()["orthanc"]
    config = orthanc_json()
    [script] = config["LuaScripts"]
    assert bind_source(mount_at(orthanc, script)) == LUA
    assert bind_source(mount_at(orthanc, "/etc/orthanc/orthanc.json")) == COMPOSE_DIR / "orthanc.json"
    assert mount_at(orthanc, config["StorageDirectory"])["type"] == "volume"
    published = {str(p).split(":")[-1] for p in orthanc["ports"]}
    assert {str(config["DicomPort"]), str(config["HttpPort"])} <= published
    # DICOMweb for OHIF: the plugin loaded by the image, its section as the tests configure it.
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert config["DicomWeb"] == {"Enable": True, "Root": "/dicom-web/"}


def test_node_configuration_loads_and_agrees_with_orthanc_and_the_routing_script() -> None:
    settings = load_config(COMPOSE_DIR / "screener.toml")
    config = orthanc_json()
    node = settings.node
    assert (node.ae_title, node.port, node.bind_address) == ("CXRBMD", 11112, "0.0.0.0")
    assert node.allowed_calling_aes == (config["DicomAet"],) == ("ORTHANC",)
    assert (node.health_port, node.health_bind_address) == (8080, "0.0.0.0")
    assert settings.data_dir == Path("/data") and settings.storage.database_url == ""
    # The results go back to the orthanc service's DICOM port and AE title.
    [destination] = settings.destinations
    assert (destination.ae_title, destination.host, destination.port) == (config["DicomAet"], "orthanc", config["DicomPort"])
    assert "orthanc" in services()
    # Orthanc knows the node under the modality the Lua script routes to, at the node's AE
    # title, service name and port; and the script skips what arrives from the node's AE.
    modality = config["DicomModalities"][lua_constant("NODE_MODALITY")]
    assert modality == [node.ae_title, "screener", node.port]
    assert lua_constant("NODE_AET") == node.ae_title == settings.dispatch.calling_ae
    # The health check asks the port the node serves /health on.
    assert f":{node.health_port}/health" in " ".join(services()["screener"]["healthcheck"]["test"])


def test_multi_node_configuration_is_the_stack_configuration_on_the_postgres_service() -> None:
    single = load_config(COMPOSE_DIR / "screener.toml")
    multi = load_config(COMPOSE_DIR / "screener.multi-node.toml")
    assert multi.storage.database_url.startswith("postgresql+psycopg://")
    postgres = services()["postgres"]["environment"]
    assert (f"{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{postgres['POSTGRES_DB']}"
            in multi.storage.database_url)
    assert multi.to_dict() | {"storage": None} == single.to_dict() | {"storage": None}
    assert multi.data_dir == single.data_dir
    # Both nodes of the profile mount the same configuration and the same spool volume.
    nodes = [services()["screener"], services()["screener-2"]]
    assert services()["screener-2"]["profiles"] == ["multi-node"]
    assert len({mount_at(s, NODE_CONFIG)["source"] for s in nodes}) == 1
    assert {mount_at(s, "/data")["source"] for s in nodes} == {"screener-data"}
    assert "${SCREENER_TOML:-./screener.toml}:" in COMPOSE.read_text()
    assert (COMPOSE_DIR / "screener.multi-node.toml").is_file()


def test_ohif_is_served_by_nginx_with_our_app_config_and_dicomweb_passed_to_orthanc() -> None:
    ohif = services()["ohif"]
    assert ohif["image"].startswith("nginx:")
    assert [str(p).split(":")[-2:] for p in ohif["ports"]] == [["3000", "3000"]]
    conf_mount = mount_at(ohif, "/etc/nginx/conf.d/default.conf")
    nginx = bind_source(conf_mount).read_text()
    assert re.search(r"^\s*listen 3000;", nginx, re.M)
    [proxied] = re.findall(r"location /dicom-web/ \{(.*?)\}", nginx, re.S)
    assert re.search(r"proxy_pass http://orthanc:8042/dicom-web/;", proxied)
    assert re.search(r"proxy_set_header Host \$http_host;", proxied)  # BulkDataURIs back through nginx
    # app-config.js: the repository's, at the path nginx serves it from.
    [alias] = re.findall(r"location = /app-config\.js \{[^}]*alias ([^;]+);", nginx)
    assert bind_source(mount_at(ohif, alias)) == ROOT / "deploy" / "ohif" / "app-config.js"
    assert "wadoRoot: '/dicom-web'" in (ROOT / "deploy" / "ohif" / "app-config.js").read_text()
    assert re.search(r"try_files \$uri \$uri/ /index\.html;", nginx)
    # The viewer's files: the volume the one-shot ohif-dist service fills with deploy/ohif/install.sh.
    [root] = re.findall(r"^\s*root ([^;]+);", nginx, re.M)
    dist = services()["ohif-dist"]
    volume = [m for m in mounts(ohif) if m["type"] == "volume"]
    assert len(volume) == 1 and root.startswith(volume[0]["target"].rstrip("/") + "/")
    [filled] = [m for m in mounts(dist) if m["source"] == volume[0]["source"]]
    assert root in dist["command"] and filled["target"] == volume[0]["target"]
    script = [m for m in mounts(dist) if m["type"] == "bind"]
    assert [bind_source(m) for m in script] == [ROOT / "deploy" / "ohif" / "install.sh"]
    assert script[0]["target"] in dist["command"]
    assert ohif["depends_on"]["ohif-dist"]["condition"] == "service_completed_successfully"
    assert "orthanc" in ohif["depends_on"]


def test_readme_names_the_commands() -> None:
    readme = (COMPOSE_DIR / "README.md").read_text()
    for needle in ("docker compose up --build", "podman compose up --build", "--profile multi-node",
                   "storescu", "4242", "ORTHANC", "http://localhost:3000"):
        assert needle in readme, needle
