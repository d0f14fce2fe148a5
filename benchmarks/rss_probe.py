"""Run in a fresh process: compute and apply an n-edit PMET batch, print peak RSS as JSON."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    import pmetlab
    from pmetlab import EditRequest, PMETHyperParams, compute_deltas, edited
    from pmetlab.datasets import load_counterfact

    if a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

        model, tok = make_tiny_model("LlamaForCausalLM", initializer_range=0.2), make_tiny_tokenizer()
        hp = PMETHyperParams.preset("smollm2-135m").replace(layers=(0, 1), v_num_grad_steps=5, cov_tokens=3000)
    else:
        model, tok = pmetlab.load_model("smollm2-135m")
        hp = PMETHyperParams.preset("smollm2-135m")
    reqs = [EditRequest.from_counterfact(r) for r in list(load_counterfact())[: a.n]]
    d = compute_deltas(model, tok, reqs, hp, progress=False, cache_targets=False)
    with edited(model, d):
        pass
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    p = d.meta["targets"]["final_p_target"]
    print(
        json.dumps(
            {
                "peak_rss_mb": round(peak_kb / 1024, 1),
                "seconds": round(time.perf_counter() - t0, 1),
                "mean_final_p_target": sum(p) / len(p),
            }
        )
    )


if __name__ == "__main__":
    main()
