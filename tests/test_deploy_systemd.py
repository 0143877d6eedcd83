"""The systemd deployment (deploy/systemd/): the unit passes `systemd-analyze verify` as shipped
and in its documented GPU and privileged-port variants, carries the sandbox it promises, and
the sysusers.d / tmpfiles.d files are applied for real by systemd's own tools into a scratch
root. systemd-analyze is a CI dependency (Debian package systemd), like DCMTK: missing, the
tests fail, they do not skip."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from screener.config import load_config
from tests.support.common import ROOT

SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "cxr-bmd-screener.service"
SYSUSERS = SYSTEMD / "cxr-bmd-screener.sysusers"
TMPFILES = SYSTEMD / "cxr-bmd-screener.tmpfiles"
INSTALL = SYSTEMD / "install.sh"
VENV_SCREENER = "/opt/cxr-bmd-screener/venv/bin/screener"
CONFIG = "/etc/cxr-bmd-screener/screener.toml"
STATE = "/var/lib/cxr-bmd-screener"


def systemd_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} not found: install the Debian package systemd (apt-get install systemd); "
                    "the deploy/systemd tests need systemd's own tools")
    return found


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def unit_for_verify(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with the venv's screener replaced by the one installed here: verify checks that
    ExecStart's binary exists and is executable, and /opt/cxr-bmd-screener/venv is not here."""
    screener = shutil.which("screener")
    if screener is None:
        pytest.fail("the screener console script is not on PATH: python3 -m pip install -e '.[dev]'")
    text = UNIT.read_text() if text is None else text
    assert VENV_SCREENER in text
    path = tmp_path / UNIT.name
    path.write_text(text.replace(VENV_SCREENER, screener))
    return path


def verify(path: Path) -> None:
    result = run(systemd_tool("systemd-analyze"), "verify", str(path))
    output = (result.stdout + result.stderr).strip()
    # verify exits 0 on keys it ignores (a misspelt key, a bad value): it only says so. Any line
    # about this unit, or any unknown/invalid key at all, is a failure.
    problems = [line for line in output.splitlines()
                if UNIT.name in line or re.search(r"Unknown key|Unknown section|Invalid|Failed to parse|ignoring", line)]
    assert result.returncode == 0, f"systemd-analyze verify exited {result.returncode}:\n{output}"
    assert problems == [], "systemd-analyze verify:\n" + "\n".join(problems)


def gpu_variant(text: str) -> str:
    """The unit as the GPU comment tells an administrator to change it."""
    lines = [line for line in text.splitlines() if line != "PrivateDevices=yes"]
    return "\n".join(re.sub(r"^#((PrivateDevices|DevicePolicy|DeviceAllow)=)", r"\1", line) for line in lines) + "\n"


def privileged_port_variant(text: str) -> str:
    """The unit as the CAP_NET_BIND_SERVICE comment tells an administrator to change it."""
    assert "#   CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in text and "#   AmbientCapabilities=CAP_NET_BIND_SERVICE" in text
    return (text.replace("\nCapabilityBoundingSet=\n", "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n")
                .replace("\nAmbientCapabilities=\n", "\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"))


@pytest.mark.parametrize("variant", ["as shipped", "gpu", "port below 1024"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, variant: str) -> None:
    text = UNIT.read_text()
    if variant == "gpu":
        text = gpu_variant(text)
        assert "PrivateDevices=no" in text and "DeviceAllow=/dev/nvidiactl rw" in text.splitlines()
    elif variant == "port below 1024":
        text = privileged_port_variant(text)
        assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text.splitlines()
    verify(unit_for_verify(tmp_path, text))


def test_verify_catches_what_it_should(tmp_path: Path) -> None:
    # The check above is only as good as its reading of verify's output: a misspelt key and a
    # binary that does not exist must both be caught.
    bad = tmp_path / "misspelt"
    bad.mkdir()
    with pytest.raises(AssertionError, match="ProtectSystm"):
        verify(unit_for_verify(bad, UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")))
    missing = tmp_path / "missing"
    missing.mkdir()
    path = missing / UNIT.name
    path.write_text(UNIT.read_text())  # /opt/cxr-bmd-screener/venv/bin/screener: not here
    if not Path(VENV_SCREENER).exists():
        with pytest.raises(AssertionError):
            verify(path)


def parse_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


def test_unit_runs_the_venv_screener_as_its_own_user_with_the_sandbox() -> None:
    unit = parse_unit(UNIT)
    service = unit["Service"]
    assert service["ExecStart"] == f"{VENV_SCREENER} serve --config {CONFIG}"
    expected = {
        "User": "screener", "Group": "screener",
        "WorkingDirectory": STATE, "StateDirectory": "cxr-bmd-screener",
        "ProtectSystem": "strict", "ReadWritePaths": STATE,
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectHome": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes", "RestrictRealtime": "yes", "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "Restart": "on-failure", "RestartSec": "5", "TimeoutStopSec": "90", "KillMode": "mixed",
    }
    assert {key: service.get(key) for key in expected} == expected
    # Environment= appears several times; configparser keeps the last, so read the lines.
    lines = UNIT.read_text().splitlines()
    assert "Environment=PYTHONUNBUFFERED=1" in lines
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Unit"]["Wants"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # The GPU and privileged-port instructions are there, as comments.
    for line in ("#PrivateDevices=no", "#DevicePolicy=closed", "#DeviceAllow=/dev/nvidiactl rw",
                 "#DeviceAllow=/dev/nvidia-uvm rw"):
        assert line in lines
    assert "CAP_NET_BIND_SERVICE" in UNIT.read_text()
    assert "MemoryDenyWriteExecute=yes" not in [line for line in lines if not line.startswith("#")]


def config_lines(path: Path) -> list[list[str]]:
    return [shlex.split(line) for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def config_lines_of(path: Path, sep: str) -> dict[str, list[str]]:
    """/etc/passwd-style records by name."""
    return {line.split(sep)[0]: line.split(sep) for line in path.read_text().splitlines() if line}


def test_sysusers_and_tmpfiles_fields() -> None:
    users = config_lines(SYSUSERS)
    assert all(len(fields) == 6 for fields in users), users
    assert ["g", "screener", "-", "-", "-", "-"] in users
    [user] = [f for f in users if f[0] == "u"]
    assert user[1] == "screener" and user[4] == STATE and user[5] == "/usr/sbin/nologin"
    assert config_lines(TMPFILES) == [
        ["d", "/etc/cxr-bmd-screener", "0750", "root", "screener", "-"],
        ["d", STATE, "0750", "screener", "screener", "-"],
    ]


def test_sysusers_and_tmpfiles_apply_with_systemds_own_tools(tmp_path: Path) -> None:
    sysusers, tmpfiles = systemd_tool("systemd-sysusers"), systemd_tool("systemd-tmpfiles")
    # Dry runs against an empty scratch root: on the host the user may exist already (a machine
    # where install.sh ran), and then sysusers has nothing to say.
    empty = tmp_path / "empty"
    (empty / "etc").mkdir(parents=True)
    if "--dry-run" in run(sysusers, "--help").stdout:
        result = run(sysusers, "--dry-run", f"--root={empty}", str(SYSUSERS))
        assert result.returncode == 0, result.stderr
        assert "screener" in result.stdout + result.stderr
    if "--dry-run" in run(tmpfiles, "--help").stdout:  # systemd >= 256
        result = run(tmpfiles, "--dry-run", f"--root={empty}", "--create", str(TMPFILES))
        assert result.returncode == 0, result.stderr
    if os.geteuid() != 0:
        return  # applying them chowns to the new user: only root can; the field check above stands
    # For real, into a scratch root: the user and group appear in its /etc/passwd and
    # /etc/group, and the folders with the modes and owners the unit relies on.
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = run(sysusers, f"--root={root}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    passwd = config_lines_of(root / "etc" / "passwd", ":")
    groups = config_lines_of(root / "etc" / "group", ":")
    assert passwd["screener"][5] == STATE and passwd["screener"][6] == "/usr/sbin/nologin"
    uid, gid = int(passwd["screener"][2]), int(groups["screener"][2])
    assert uid < 1000 and gid == int(passwd["screener"][3])  # a system user, its own group
    result = run(tmpfiles, f"--root={root}", "--create", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    for path, owner in ((root / "etc" / "cxr-bmd-screener", (0, gid)), (root / STATE.lstrip("/"), (uid, gid))):
        info = path.stat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o750, path
        assert (info.st_uid, info.st_gid) == owner, path
    # Applying them again changes nothing and fails nothing (install.sh is run on upgrades).
    assert run(sysusers, f"--root={root}", str(SYSUSERS)).returncode == 0
    assert run(tmpfiles, f"--root={root}", "--create", str(TMPFILES)).returncode == 0
    assert int(config_lines_of(root / "etc" / "passwd", ":")["screener"][2]) == uid


def shell_code(text: str) -> list[str]:
    """The script's lines outside here-documents (what it prints is not what it runs)."""
    code, end = [], None
    for line in text.splitlines():
        if end is not None:
            end = None if line.strip() == end else end
            continue
        code.append(line)
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        end = heredoc.group(1) if heredoc else None
    return code


def test_install_script_help_and_syntax() -> None:
    text = INSTALL.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert os.access(INSTALL, os.X_OK), "deploy/systemd/install.sh must be executable"
    assert subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True).returncode == 0
    result = subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for needle in ("systemctl enable --now cxr-bmd-screener", "/opt/cxr-bmd-screener/venv", "python3 -m venv",
                   "/etc/systemd/system", "/etc/sysusers.d", "/etc/tmpfiles.d", CONFIG, STATE):
        assert needle in result.stdout, needle
    # It prints systemctl commands but never runs systemctl itself (containers often cannot).
    assert not [line for line in shell_code(text) if re.search(r"(^|[;&|(]\s*)systemctl\b", line.strip())]
    bad = subprocess.run([str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--help" in bad.stderr


def test_install_script_writes_a_configuration_the_node_accepts(tmp_path: Path) -> None:
    # install.sh: sed "s|^data_dir = .*|data_dir = \"/var/lib/cxr-bmd-screener\"|" config.example.toml
    assert 's|^data_dir = .*|data_dir = \\"$DATA_DIR\\"|' in INSTALL.read_text()
    example = (ROOT / "config.example.toml").read_text()
    assert len(re.findall(r"(?m)^data_dir = ", example)) == 1
    config = tmp_path / "screener.toml"
    config.write_text(re.sub(r"(?m)^data_dir = .*$", f'data_dir = "{STATE}"', example))
    settings = load_config(config)
    assert settings.data_dir == Path(STATE)
    assert settings.storage.data_dir == STATE
