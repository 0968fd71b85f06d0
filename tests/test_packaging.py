"""pyproject.toml installs every package of the source tree: a package missing from its list imports in an
editable install (the source tree is on the path) but is absent from a wheel."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_packages(directory: str, name: str) -> set[str]:
    found = set()
    for parent, folders, files in os.walk(os.path.join(ROOT, directory)):
        folders[:] = [f for f in folders if not f.startswith((".", "__"))]
        if "__init__.py" in files:
            relative = os.path.relpath(parent, os.path.join(ROOT, directory))
            found.add(name if relative == "." else f"{name}.{relative.replace(os.sep, '.')}")
    return found


def test_every_source_package_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {"moejax": "moejax", **setuptools.get("package-dir", {})}
    in_tree = set().union(*(_source_packages(folder, name) for name, folder in folders.items()))
    assert in_tree - listed == set(), "packages in the source tree that a wheel would leave out"
    assert listed - in_tree == set(), "packages listed in pyproject.toml with no __init__.py in the tree"
