"""notebooks/quickstart.ipynb runs top to bottom on the CPU (so it cannot rot), and importing moejax is quiet
(a notebook shows everything a library prints or warns at import)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
KERNEL = "moejax-test-python"  # a kernel spec of our own, so the kernel is this interpreter, never another python3


def test_import_is_silent():
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import moejax, moejax.buffering, moejax.placement, moejax.evaluation"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", (result.stdout, result.stderr)


def test_notebook_is_saved_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:80]


def _text(cell) -> str:
    """A code cell's stream and text/plain outputs, joined."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _cell(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected, found {len(cells)}"
    return cells[0]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # Register a kernel spec that runs ipykernel on this interpreter (the venv's), found through JUPYTER_PATH.
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "moejax tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits the environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel then shows figures inline (as image/png)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    seconds = time.perf_counter() - start
    print(f"quickstart.ipynb executed in {seconds:.1f} s")

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not any(o.output_type == "error" for o in cell.outputs), cell.source[:80]

    # moejax is installed here, so the install cell does nothing and says nothing; importing prints no warnings.
    assert _text(_cell(nb, "install")) == ""
    imports = _cell(nb, "imports")
    assert not any(o.output_type == "stream" and o.name == "stderr" for o in imports.outputs), _text(imports)

    generated = _text(_cell(nb, "generate"))
    prompt = "class Config:\n    def __init__(self"
    assert generated.startswith(prompt) and generated[len(prompt):].strip(), generated

    table = _text(_cell(nb, "policies"))
    rows = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(dropless|capacity factor [\d.]+)\s+([\d.]+)\s+([\d.]+)$", table, re.M)}
    assert set(rows) == {"dropless", "capacity factor 1.0", "capacity factor 1.5"}, table
    assert rows["dropless"][1] == 0.0, table
    assert rows["capacity factor 1.0"][1] > rows["capacity factor 1.5"][1] > 0.0, table
    for perplexity, _ in rows.values():
        assert 1.0 < perplexity < 2048, table  # the default model's vocabulary: below uniform guessing

    heatmap = _cell(nb, "heatmap")
    assert any("image/png" in o.get("data", {}) for o in heatmap.outputs), "the heatmap cell showed no figure"

    misses = _text(_cell(nb, "buffering"))
    rates = {int(m.group(1)): [float(x) for x in m.group(2).split()]
             for m in re.finditer(r"^(\d+)\s+((?:[\d.]+\s*){3})$", misses, re.M)}
    assert sorted(rates) == [4, 8, 16, 24], misses
    for size, (lifo, lru, belady) in rates.items():
        assert 0 <= belady <= min(lifo, lru) <= 1, misses  # Belady's MIN is the optimum
    assert rates[24][0] < rates[4][0], misses  # more slots, fewer misses
