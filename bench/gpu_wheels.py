"""Download the wheels bench/gpu.py needs on the GPU machine, whose image lacks some of them.

    python3 bench/gpu_wheels.py [--dest .whl]

The GPU machine (Python 3.12, x86_64, its own torch / transformers / accelerate) reaches no
package registry; what it lacks travels with the working tree as wheels (`carry: [".whl"]`) and
is installed there into /tmp/site before the run (docs/memory.md, "GPU benchmark", has the
command). Versions are those installed here (what the tests ran with), else the pins below.
Keep the folder out of git: `echo /.whl/ >> .git/info/exclude`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: missing from the GPU machine's image (diffusers, torchao, pydantic) or pinned differently
#: there (peft); each with the versions to use when not installed here
WANTED = {
    "diffusers": "0.42.1",
    "peft": "0.21.2",
    "torchao": "0.18.0",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": None,
    "typing-inspection": None,
    "typing-extensions": None,
    "importlib-metadata": None,
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirement(name: str, pinned: str | None) -> str:
    version = installed_version(name) or pinned
    if name == "torchao" and version is None:
        version = _extras_torchao()
    return f"{name}=={version}" if version else name


def _extras_torchao() -> str | None:
    """`make install` keeps torchao in <venv>/extras, outside the package metadata path."""
    for info in (Path(sys.prefix) / "extras").glob("torchao-*.dist-info"):
        return info.name.removeprefix("torchao-").removesuffix(".dist-info")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=".whl", help="folder for the wheels (default .whl)")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "-d", args.dest]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += [requirement(name, pinned) for name, pinned in WANTED.items()]
    print(" ".join(command), flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
