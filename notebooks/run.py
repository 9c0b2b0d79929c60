"""Run the notebooks as Jupyter runs them and keep their outputs: `make notebooks` (or
`python notebooks/run.py [NAME.ipynb ...]`, default: every notebook here).

Each notebook runs top to bottom in a fresh kernel of this Python (its own kernelspec, made for the
run: the kernel imports what this interpreter's environment holds), in this folder, with a timeout
per cell; the first error stops it and nothing is written. The executed notebook is written back
with its outputs and, in its metadata, the hash of the code cells that produced them (`code_hash`):
tests/test_notebooks.py fails when a committed notebook's code no longer matches its outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from ipykernel.kernelspec import get_kernel_dict
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

DIR = Path(__file__).resolve().parent
CELL_TIMEOUT = 300  # seconds for one cell
KERNEL = "dsv32-jax"
META = "dsv32_jax"  # the notebook metadata key holding {"code_sha256": ...}
# A Jupyter user opens the notebooks with their own Python 3 kernel.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def notebooks() -> list[Path]:
    return sorted(DIR.glob("*.ipynb"))


def code_hash(nb) -> str:
    """sha256 of the notebook's code cells' sources, in order."""
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256(json.dumps(code).encode()).hexdigest()


def stored_hash(nb) -> str | None:
    return nb.metadata.get(META, {}).get("code_sha256")


@contextlib.contextmanager
def _kernel():
    """A kernel manager whose kernel is this interpreter (a kernelspec in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="dsv32-kernel-") as d:
        spec = Path(d, KERNEL)
        spec.mkdir()
        (spec / "kernel.json").write_text(json.dumps(get_kernel_dict()))
        yield KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[d]),
                            transport="ipc", ip=str(Path(d, "ipc")))  # local sockets, not TCP ports


def execute(nb, timeout: int = CELL_TIMEOUT):
    """Run `nb`'s cells in order in a fresh kernel (cwd: this folder); raises nbclient's
    CellExecutionError at the first cell that fails, CellTimeoutError at one that runs past
    `timeout` seconds. Returns `nb`, its outputs filled in."""
    with _kernel() as km:
        NotebookClient(nb, km=km, timeout=timeout, record_timing=False, coalesce_streams=True,
                       resources={"metadata": {"path": str(DIR)}}).execute()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return nb


def machine_paths(nb) -> list[str]:
    """Paths of this machine that the outputs show (they would differ on every machine)."""
    roots = {str(DIR.parent), tempfile.gettempdir().rstrip("/") + "/", sys.prefix, os.path.expanduser("~")}
    text = json.dumps([c.get("outputs", []) for c in nb.cells if c.cell_type == "code"])
    return sorted(r for r in roots if r in text)


def run(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    t = time.perf_counter()
    execute(nb)
    dt = time.perf_counter() - t
    shown = machine_paths(nb)
    if shown:
        raise SystemExit(f"{path.name}: its outputs show this machine's paths {shown}: not written")
    nb.metadata[META] = {"code_sha256": code_hash(nb)}
    nbformat.write(nb, path)
    return dt


def main(argv: list[str]) -> int:
    paths = [DIR / a for a in argv] if argv else notebooks()
    for path in paths:
        if not path.is_file():
            print(f"{path}: no such notebook", file=sys.stderr)
            return 2
    for path in paths:
        print(f"{path.name} ...", end=" ", flush=True)
        print(f"{run(path):.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
