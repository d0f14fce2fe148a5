"""Run the numbered notebooks with papermill (``make figures``, ``pmetlab notebooks``), or copy them
out to edit (``pmetlab notebooks --copy DIR``).

The notebooks live in the repository's ``notebooks/``; a wheel ships a copy of them inside the
package (``pmetlab/_notebooks``). :data:`NOTEBOOKS_DIR` is that copy for a wheel install and the
checkout's folder for an editable one (:func:`find_notebooks_dir`). :func:`copy_notebooks` writes
editable copies of the pairs into a folder of one's own.

Every notebook is a jupytext pair: ``NN_name.ipynb`` (what JupyterLab opens and papermill runs)
and ``NN_name.py`` in the percent format (what diffs and reviews read); both carry the jupytext
metadata ``formats: ipynb,py:percent``, so JupyterLab with jupytext saves both, and
``jupytext --sync notebooks/*.ipynb`` brings them together from the command line (it takes the
cells of the more recently modified file).

Every notebook has one cell tagged ``parameters`` (scalars: ``MODEL``, ``SEED``, ``SMOKE``,
``OUTPUT_DIR``, ...). :func:`run_notebooks` executes the chosen notebooks one after the other,
each in a fresh kernel, with ``OUTPUT_DIR`` set to ``out_dir``; the executed copies
(``out_dir/NAME.ipynb``), the figures (PNG + PDF + the CSV of their numbers) and tables land
there, with ``report.json`` describing the run. A failing notebook is logged with the cell
and the error line and does not stop the others.

A pair whose two files disagree (cell sources, types or tags) is never run: which side is right
is the researcher's call, not a timestamp's, and running the ``.ipynb`` could silently run stale
code. :func:`run_notebooks` refuses before running anything, with a one-line message naming the
pair, the first difference, the newer file and the ``jupytext --sync`` command that fixes it.
Nothing here rewrites a notebook.

The kernels are the runner's own (:func:`kernel_spec`): IPython on the Python running pmetlab,
whichever kernelspecs the machine has, with ``tqdm.auto`` progress bars as text, so executed copies
hold a line per bar, not widget JSON. Opened in JupyterLab with ipywidgets installed, the same bars
are widgets.

papermill, ipykernel and jupytext are optional dependencies (``pip install 'pmetlab[notebooks]'``);
they are imported only when notebooks are checked or run.
"""

from __future__ import annotations

from .folder import (
    EXPECTED_OUTPUTS,
    NOTEBOOKS_DIR,
    PAIRED_FORMATS,
    copy_notebooks,
    find_notebooks_dir,
    list_notebooks,
    notebook_parameters,
    notebook_titles,
)
from .pairs import NotebookPairError, check_pairs, pair_differences
from .runner import kernel_spec, run_notebooks

__all__ = [
    "EXPECTED_OUTPUTS",
    "NOTEBOOKS_DIR",
    "PAIRED_FORMATS",
    "NotebookPairError",
    "copy_notebooks",
    "find_notebooks_dir",
    "kernel_spec",
    "list_notebooks",
    "notebook_parameters",
    "notebook_titles",
    "pair_differences",
    "check_pairs",
    "run_notebooks",
]
