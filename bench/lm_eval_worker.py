"""lm-eval's own command line (``lm-eval run ...``), run unchanged in lm-eval's environment, with a stopwatch on
its HF model: how long ``HFLM`` takes to load and how long its ``loglikelihood`` takes (tokenising the requests and
scoring them), written to a JSON file. Started by ``bench/lm_eval_bench.py``; it imports nothing of safetypatch.

    python bench/lm_eval_worker.py TIMING.json run --model hf --model_args pretrained=DIR,dtype=float32 ...
"""

from __future__ import annotations

import functools
import json
import sys
import time


def timed(timings: dict, key: str, method):
    """``method`` wrapped so that each call adds its seconds to ``timings[key + "_seconds"]`` and counts itself."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            timings[f"{key}_seconds"] = timings.get(f"{key}_seconds", 0.0) + time.perf_counter() - start
            timings[f"{key}_calls"] = timings.get(f"{key}_calls", 0) + 1

    return wrapper


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    timing_path, cli_args = argv[0], argv[1:]
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.models.huggingface import HFLM

    timings: dict = {}
    original_loglikelihood = HFLM.loglikelihood
    HFLM.__init__ = timed(timings, "load", HFLM.__init__)
    loglikelihood = timed(timings, "loglikelihood", original_loglikelihood)

    def counted(self, requests, *args, **kwargs):
        timings["requests"] = timings.get("requests", 0) + len(requests)
        return loglikelihood(self, requests, *args, **kwargs)

    HFLM.loglikelihood = counted
    sys.argv = ["lm-eval", *cli_args]
    cli_evaluate()
    import torch

    timings.update(worker_seconds=time.perf_counter() - start, torch_threads=torch.get_num_threads())
    with open(timing_path, "w") as out:
        json.dump(timings, out)


if __name__ == "__main__":
    main(sys.argv[1:])
