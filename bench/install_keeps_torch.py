"""Does ``pip install -e .`` keep the torch a researcher already has? (issue 24: "installs into an existing
environment").

Makes a fresh virtual environment (no system site-packages), installs a torch 2.x that is not the version
``constraints.txt`` pins, then runs ``pip install -e REPO`` with pip's configuration files ignored (no
constraint file, no local wheel folder: what a user's own machine does) and asserts that torch's version and
files are unchanged. Exit 0 when kept, 1 when pip replaced it.

Which torch:
- default: a stand-in distribution named ``torch`` (``--stand-in-version``, 2.5.1), metadata and an empty
  package only, built here. pip's decision to keep or replace torch reads only the installed distribution's
  name and version, so this checks exactly that decision without downloading another torch: the registry's
  other torch 2.x wheels for Linux are CUDA builds (~0.8 GB, plus GBs of nvidia-* wheels).
- ``--torch-wheel PATH``: a real torch wheel file, e.g. a CPU build you already have.

``--dry-run``: resolve only (``pip install --dry-run --report``) and report whether pip would replace torch;
no dependency is installed (seconds instead of minutes). ``--repo`` may point at an older checkout: with
``torch==2.13.0`` in install_requires (before setup.cfg had ranges) the check fails.

    python bench/install_keeps_torch.py                    # full install, stand-in torch 2.5.1
    python bench/install_keeps_torch.py --dry-run
    python bench/install_keeps_torch.py --torch-wheel /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import importlib.metadata as m, json; d = m.distribution('torch'); "
         "print(json.dumps({'version': d.version, 'files': len(d.files or []), 'location': str(d.locate_file(''))}))")


def stand_in_torch_wheel(version: str, folder: Path) -> Path:
    """A minimal wheel of a distribution named torch at ``version``: an empty ``torch`` package."""
    name = f"torch-{version}"
    files = {
        "torch/__init__.py": f'__version__ = "{version}"  # stand-in for bench/install_keeps_torch.py\n',
        f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{name}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: install_keeps_torch\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}.dist-info/RECORD"] = "\n".join(record + [f"{name}.dist-info/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def run(command: list[str], env: dict | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to install (default: %(default)s)")
    parser.add_argument("--torch-wheel", type=Path, help="a real torch wheel to start from (default: a stand-in)")
    parser.add_argument("--stand-in-version", default="2.5.1", help="version of the stand-in (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="resolve only: would pip replace torch?")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="install-keeps-torch-") as tmp:
        tmp = Path(tmp)
        venv = tmp / "venv"
        run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
        python = str(venv / "bin" / "python")
        wheel = args.torch_wheel or stand_in_torch_wheel(args.stand_in_version, tmp)
        run([python, "-m", "pip", "install", "--no-deps", str(wheel)])
        before = json.loads(run([python, "-c", PROBE]))
        print(f"torch before: {before['version']} ({before['files']} files) from {wheel.name}")
        # no pip configuration: no constraint file, no local wheel folder, as on a user's machine
        env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")
               or key in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")} | {"PIP_CONFIG_FILE": os.devnull}
        clock = time.perf_counter()
        if args.dry_run:
            report = tmp / "report.json"
            run([python, "-m", "pip", "install", "--dry-run", "--report", str(report), "-e", str(args.repo)], env)
            installs = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                        for item in json.loads(report.read_text())["install"]}
            replaced = "torch" in installs
            print(f"pip install --dry-run -e {args.repo}: {len(installs)} distributions to install "
                  f"({time.perf_counter() - clock:.0f} s); torch {'-> ' + installs['torch'] if replaced else 'kept'}")
            return 1 if replaced else 0
        run([python, "-m", "pip", "install", "-e", str(args.repo)], env)
        after = json.loads(run([python, "-c", PROBE]))
        print(f"pip install -e {args.repo}: {time.perf_counter() - clock:.0f} s; torch after: {after['version']} "
              f"({after['files']} files)")
        print(run([python, "-m", "pip", "show", "vn30-qlib"]).splitlines()[1])  # Version: ...
        return 0 if after == before else 1


if __name__ == "__main__":
    sys.exit(main())
