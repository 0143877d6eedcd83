"""The real DICOM validators, run on files: dciodvfy, dsrdump and the PixelMed SR validator.

Each runner returns ``(errors, warnings)`` as lists of output lines, so that a test can assert
``errors == []`` and print the warnings. A validator that is not installed raises
:class:`ValidatorNotInstalled` (an AssertionError, so the test fails rather than skips): an
object nobody validated must not look like a passing one.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["ValidatorNotInstalled", "dciodvfy", "dsrdump", "pixelmed_sr", "pixelmed_classpath"]

TIMEOUT_S = 300

_INSTALL_HINT = "run .ci/run (it installs the validators) or `apt-get install {package}`"


class ValidatorNotInstalled(AssertionError):
    """A validator the tests depend on is missing from this machine."""


def _executable(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ValidatorNotInstalled(f"{name} not found on PATH: " + _INSTALL_HINT.format(package=package))
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """dicom3tools IOD check: lines starting with "Error" are errors, "Warning" warnings."""
    exe = _executable("dciodvfy", "dicom3tools")
    proc = _run([exe, str(path)])
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def dsrdump(path: str | Path) -> tuple[list[str], list[str]]:
    """DCMTK SR parser: must exit 0 and say nothing about errors or invalid codes.

    Run with all codes and template ids printed, so that a code DCMTK cannot parse shows up as
    "invalid code" in the dump.
    """
    exe = _executable("dsrdump", "dcmtk")
    proc = _run([exe, "+Pc", "+Pt", "+Pl", str(path)])
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [
        line for line in lines
        if re.match(r"^[EF]: ", line) or "error" in line.lower() or "invalid code" in line.lower()
    ]
    if proc.returncode != 0:
        errors.append(f"dsrdump exited with status {proc.returncode}")
    warnings = [line for line in lines if line.startswith("W: ")]
    return errors, warnings


def pixelmed_classpath() -> str:
    """The PixelMed jar (Debian libpixelmed-java); the SR validator needs nothing else."""
    candidates = [os.environ.get("PIXELMED_JAR", ""), "/usr/share/java/pixelmed.jar"]
    candidates += sorted(glob.glob("/usr/share/java/pixelmed*.jar"))
    for jar in candidates:
        if jar and Path(jar).is_file():
            return jar
    raise ValidatorNotInstalled(
        "PixelMed jar not found (/usr/share/java/pixelmed.jar): " + _INSTALL_HINT.format(package="libpixelmed-java")
    )


def pixelmed_sr(path: str | Path) -> tuple[list[str], list[str]]:
    """PixelMed DicomSRValidator (IOD + templates), with template row order and ids checked.

    The xpath limits are lifted because Java 17 otherwise refuses PixelMed's large stylesheets.
    """
    java = _executable("java", "default-jre-headless")
    proc = _run([
        java,
        "-Djdk.xml.xpathExprOpLimit=0",
        "-Djdk.xml.xpathExprGrpLimit=0",
        "-Djdk.xml.xpathTotalOpLimit=0",
        "-cp", pixelmed_classpath(),
        "com.pixelmed.validate.DicomSRValidator",
        "-checkcontentitemorder",
        "-checktemplateid",
        str(path),
    ])
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error") or "Exception" in line]
    if proc.returncode != 0:
        errors.append(f"DicomSRValidator exited with status {proc.returncode}")
    if not any("validation complete" in line.lower() for line in lines):
        errors.append("DicomSRValidator did not finish: " + " | ".join(lines[-5:]))
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings
