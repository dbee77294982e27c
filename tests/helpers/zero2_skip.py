"""One process of a torchrun launch (with ``ZERO2_ENV`` or ``ZERO3_ENV``) for the DeepSpeed
skip test in ``tests/test_world_size.py``: a 3-step run whose step-2 loss is NaN with a finite
gradient (a NaN added as a constant) and whose step-3 loss and gradient are NaN (the loss times
NaN). Process 0 writes ``{step: whether its part of the weights changed in that step's update}``
to ``moved.json`` in the run folder. ``python -m tests.helpers.zero2_skip CONFIG``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kltrain.config import load_config
from kltrain.training.distributed import exit_launched_process, leave_process_group
from kltrain.training.trainer import Trainer


def main(config: str) -> None:
    original_loss, original_optimise = Trainer._micro_batch_loss, Trainer.optimise
    moved: dict[int, bool] = {}

    def loss(self, *args):
        out = original_loss(self, *args)
        step = self.state.step + 1
        if step == 2:
            return out + torch.tensor(float("nan"))  # no gradient through the NaN
        return out * float("nan") if step == 3 else out

    def optimise(self, batch, step):
        # this process's part of each weight (ZeRO-3: its partition; outside a forward the
        # parameters themselves hold no elements)
        before = [t.clone() for t in self.zero.local_weights(self.params)]
        out = original_optimise(self, batch, step)
        after = self.zero.local_weights(self.params)
        moved[step] = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        return out

    Trainer._micro_batch_loss, Trainer.optimise = loss, optimise
    trainer = Trainer(load_config(config))
    trainer.fit()
    if trainer.accelerator.is_main_process:
        (Path(trainer.output_dir) / "moved.json").write_text(json.dumps(moved))
    leave_process_group()
    exit_launched_process()


if __name__ == "__main__":
    main(sys.argv[1])
