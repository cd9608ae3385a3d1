"""Optional libraries that `make install` keeps out of site-packages (bitsandbytes, torchao).

diffusers imports them at start-up whenever they are installed, which costs every run about a
second; so they live in `<venv>/extras` and join sys.path only when a job needs them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType


def extras_dir() -> Path:
    return Path(sys.prefix) / "extras"


def import_extra(name: str, *, needed_for: str, pip_spec: str) -> ModuleType:
    """Import `name`, from site-packages or else from <venv>/extras; a clear error otherwise."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    folder = extras_dir()
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.append(str(folder))  # after site-packages: never shadows an installed copy
        importlib.invalidate_caches()
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    raise ImportError(f"{needed_for} needs {name}, which is not installed. Fix: pip install {pip_spec}")
