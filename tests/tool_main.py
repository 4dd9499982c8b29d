"""A tool's ``main(argv)`` called as its command line calls it: through
:func:`virtex_d2.cli.run_tool`, so bad input comes back as the exit status the user sees (2)
and a bug as the exception itself."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from virtex_d2.cli import run_tool

TOOLS = Path(__file__).resolve().parents[1] / "tools"


class Tool:
    """``tools/<name>.py`` loaded as a module (tools/ is not a package); other attributes are the module's."""

    def __init__(self, name: str):
        spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
        self.module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = self.module
        spec.loader.exec_module(self.module)
        self.name = name

    def main(self, argv: list[str] | None = None) -> int:
        return run_tool(self.name, lambda: self.module.main(argv))

    def __getattr__(self, attribute: str):
        return getattr(self.module, attribute)
