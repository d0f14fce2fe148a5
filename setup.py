"""Build hook: the numbered notebooks ship inside the wheel. Everything else is set in pyproject.toml.

The notebooks live once, in the repository's ``notebooks/`` folder (jupytext pairs ``NN_name.ipynb``
+ ``NN_name.py``). A wheel carries a copy of every pair in ``pmetlab/_notebooks/``, where
``pmetlab.notebooks.find_notebooks_dir`` looks first; an editable install copies nothing and reads
the checkout's ``notebooks/`` in place. pyproject.toml cannot map a folder outside the package into
it, hence this small ``build_py``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NOTEBOOKS = Path("notebooks")  # relative to the project root, where setuptools runs this file
SHIPPED = Path("pmetlab", "_notebooks")


def notebook_pairs() -> list[Path]:
    """The files to ship: each numbered ``.ipynb`` and, when present, its paired ``.py``."""
    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(
            f"no numbered notebooks in {NOTEBOOKS.resolve()}: build from a checkout or an sdist that has them "
            "(MANIFEST.in includes them in the sdist)"
        )
    return [p for nb in notebooks for p in (nb, nb.with_suffix(".py")) if p.is_file()]


class BuildPyWithNotebooks(build_py):
    """``build_py`` plus the notebook pairs copied to ``pmetlab/_notebooks`` (not in editable mode)."""

    def _notebook_targets(self) -> list[tuple[Path, Path]]:
        if self.editable_mode:  # the checkout's notebooks/ is used where it is
            return []
        return [(src, Path(self.build_lib, SHIPPED, src.name)) for src in notebook_pairs()]

    def run(self) -> None:
        super().run()
        for src, target in self._notebook_targets():
            self.mkpath(str(target.parent))
            self.copy_file(str(src), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return list(super().get_outputs(include_bytecode)) + [str(t) for _, t in self._notebook_targets()]


setup(cmdclass={"build_py": BuildPyWithNotebooks})
