"""Extra rows of gpu_check's DMD2 table on a warm GPU machine, when the suite's time budget skipped them:

    python3 benchmarks/dmd2_rows.py shared:16:ckpt baseline-full:2:ckpt shared:4:nockpt

Each row is MODE:BATCH:ckpt|nockpt (modes of ``dmd2_iteration.run_mode``); rows print as they finish and go,
whole, to ``$OUT/rows.json`` (or ./rows.json). benchmarks/results/gpu-<device>-rows.json holds such a run.
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
import dmd2_iteration as it  # noqa: E402

SHOWN = ("mode", "batch", "checkpointing", "status", "seconds_per_iteration", "peak_memory_gib", "mfu")


def main(rows: list[str]) -> None:
    config, device, out, flops = it.sdxl_config(), torch.device("cuda"), [], {}
    target = Path(os.environ.get("OUT", ".")) / "rows.json"
    for row in rows:
        mode, batch, ckpt = row.split(":")
        batch, ckpt = int(batch), ckpt == "ckpt"
        try:
            result = it.run_mode(mode, config, batch, device, iterations=3, checkpointing=ckpt, forward_flops=flops)
        except torch.cuda.OutOfMemoryError as e:
            result = dict(mode=mode, batch=batch, checkpointing=ckpt, status="does not fit", error=str(e)[:200],
                          peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30)
        print(json.dumps({k: result.get(k) for k in SHOWN}), flush=True)
        out.append(result)
        gc.collect()
        torch.cuda.empty_cache()
        target.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
