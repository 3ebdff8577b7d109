"""`stdlib`: language modelling over the Python standard library's own source files.

Every Python installation has them (sysconfig's "stdlib" path, tens of MB of `.py` files), so the corpus
exists on every machine without a download. Site-packages and the test-suite's data folders (fixtures,
some deliberately malformed) are left out; the test suite's own modules stay in as the `test` domain
unless include_tests=false. A file's domain is its top-level package (asyncio, email, json, ...); the
modules at the top level share the domain `(modules)`. The split is by a fixed hash of the file's path
relative to the stdlib folder, so a file falls in the same split on every machine and Python version.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import sysconfig
from pathlib import Path

from routerlab.errors import ConfigError
from routerlab.tasks.base import register_task
from routerlab.tasks.corpus import CorpusParams, Document, DocumentLM

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}
TOP_LEVEL = "(modules)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StdlibParams(CorpusParams):
    root: str | None = None  # the stdlib folder; default sysconfig.get_paths()["stdlib"]
    include: list[str] | None = None  # glob patterns of relative paths to keep (e.g. ["json/*", "email/*"]); None = all
    include_tests: bool = True  # the test suite's modules (the `test` domain, about half the bytes)


def is_test_data(parts: tuple[str, ...]) -> bool:
    """A folder named like data inside a test folder: fixtures, not library code."""
    in_test = False
    for part in parts[:-1]:
        if in_test and ("data" in part.lower() or part.startswith("bad")):
            return True
        in_test = in_test or part in TEST_DIRS or part.startswith("test_")
    return False


def stdlib_files(root: Path, include: list[str] | None, include_tests: bool) -> list[str]:
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-")]  # never walk site-packages
        rel_dir = Path(folder).relative_to(root)
        for name in names:
            if not name.endswith(".py"):
                continue
            rel = rel_dir / name
            parts = rel.parts
            if is_test_data(parts) or (not include_tests and any(p in TEST_DIRS for p in parts[:-1])):
                continue
            rel_text = rel.as_posix()
            if include is not None and not any(fnmatch.fnmatch(rel_text, pattern) for pattern in include):
                continue
            out.append(rel_text)
    return sorted(out)


@register_task("stdlib", StdlibParams)
class Stdlib(DocumentLM):
    """Language modelling on the Python standard library's source (domain = top-level package)."""

    def documents(self) -> list[Document]:
        p = self.params
        root = Path(p.root or sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise ConfigError(f"the Python standard library folder {str(root)!r} does not exist; set task.root to a folder of .py files")
        files = stdlib_files(root, p.include, p.include_tests)
        if not files:
            raise ConfigError(f"no .py files under {str(root)!r} match include={p.include}; give patterns relative to that folder, e.g. ['json/*']")
        return [Document(rel, (root / rel).read_bytes(), rel.split("/")[0] if "/" in rel else TOP_LEVEL) for rel in files]
