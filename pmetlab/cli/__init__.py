"""The ``pmetlab`` command line: run experiments, precompute statistics, summarise runs, run the
notebooks, and a one-edit demo.

    pmetlab run --method pmet --dataset counterfact --n-edits 10 --hparams v_num_grad_steps=20
    pmetlab stats --model smollm2-135m --layers 3-8 --tokens 100000
    torchrun --nproc-per-node 2 -m pmetlab stats --model smollm2-135m   # sharded over 2 workers
    pmetlab summarize runs/*            # or a sweep directory
    pmetlab notebooks --out figures --smoke
    pmetlab demo

User errors (bad arguments, unknown hyperparameters, missing files) print one line
``pmetlab: error: ...`` and exit with status 2; ``-v`` logs more (with the error's traceback).

The package: ``args`` (argument types), ``parser`` (one small function per sub-command's
parser), ``commands`` (what each sub-command does) and ``entry`` (:func:`main`: logging, user
errors, exit status).
"""

from __future__ import annotations

from .args import parse_key_value, parse_layers
from .entry import main
from .parser import PROG, build_parser

__all__ = ["main", "build_parser", "parse_layers", "parse_key_value", "PROG"]
