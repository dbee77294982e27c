"""One process of a torchrun launch of ``tests/test_deepspeed.py``'s dry run over several CPU
processes (gloo): each builds the ZeRO-2 and ZeRO-3 engines and checks its step against plain
torch fed the whole batch (``dry_run``), and the chunked lm_head under ZeRO-3
(``chunked_lm_head_run``); prints ``rank R ok`` at the end."""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    import deepspeed

    from tests.test_deepspeed import DEEPSPEED_CONFIGS, chunked_lm_head_run, dry_run

    # the shared-memory all-reduce DeepSpeed compiles on CPU serves inference only (see
    # tests/test_deepspeed.py's deepspeed_world)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    torch.distributed.init_process_group("gloo")
    rank, processes = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        for name in DEEPSPEED_CONFIGS:
            dry_run(name, deepspeed, "cpu", rank, processes)
        chunked_lm_head_run(deepspeed, "cpu", rank, processes)
    finally:
        torch.distributed.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main()
