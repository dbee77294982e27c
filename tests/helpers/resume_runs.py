"""Runs of ``kltrain fit`` in child processes that die at chosen points, for the resume tests.

A "zygote" child imports kltrain once (imports cost seconds on a shared CPU); for each run it
forks a fresh process that installs the requested kill hook by monkeypatching (production code
has no test hooks), turns deterministic algorithms on and calls the CLI entry point
``kltrain.cli.main(argv)`` exactly as ``python -m kltrain fit ...`` does. The zygote never runs a
tensor operation itself, so its children start from a clean OpenMP state.

Kill points (``kill={"at": ..., "step": N}``):

- ``step``: SIGKILL inside step N, after its optimizer update, before anything is logged;
- ``save``: SIGKILL inside the save of step N, all files written but the COMPLETE marker;
- ``after_save``: SIGKILL just after the checkpoint of step N is renamed into place, before the
  old ones are pruned;
- ``sigterm_rollout``: SIGTERM to itself after step N's scoring (the step is abandoned);
- ``sigterm_update``: SIGTERM to itself inside step N's update (the step is finished).

Protocol: one JSON request per line on stdin ``{"argv": [...], "kill": {...} | null}``; one JSON
reply per line on stdout ``{"rc": int | null, "signal": int | null}``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.launch import REPO, child_env, child_pythonpath


def _install_kill(kill: dict[str, Any]) -> None:
    from kltrain.training import checkpoint
    from kltrain.training.trainer import Trainer

    at, step = kill["at"], int(kill["step"])
    name = f"{checkpoint.PREFIX}{step:08d}"
    die = lambda sig=signal.SIGKILL: os.kill(os.getpid(), sig)  # noqa: E731

    if at in ("step", "sigterm_update"):
        original = Trainer.optimise

        def optimise(self, batch, at_step):
            out = original(self, batch, at_step)
            if at_step == step:
                _stamp(kill)
                die(signal.SIGKILL if at == "step" else signal.SIGTERM)
            return out

        Trainer.optimise = optimise
    elif at == "sigterm_rollout":
        original_score = Trainer.score

        def score(self, rollout, at_step):
            out = original_score(self, rollout, at_step)
            if at_step == step:
                _stamp(kill)
                die(signal.SIGTERM)
            return out

        Trainer.score = score
    elif at == "save":
        original_write = checkpoint._write_durably

        def write(path, text):
            if path.name == checkpoint.MARKER and name in path.parent.name:
                die()
            original_write(path, text)

        checkpoint._write_durably = write
    elif at == "after_save":
        original_prune = checkpoint.prune

        def prune(root, keep_last):
            if (Path(root) / name).is_dir():
                die()
            original_prune(root, keep_last)

        checkpoint.prune = prune
    else:
        raise ValueError(f"unknown kill point {at!r}")


def _stamp(kill: dict[str, Any]) -> None:
    """Record when the signal was sent, so the test can measure the time to exit."""
    if kill.get("stamp"):
        Path(kill["stamp"]).write_text(repr(time.time()))


def _child(request: dict[str, Any]) -> None:
    import torch

    from kltrain.cli import main

    torch.use_deterministic_algorithms(True)
    if request.get("kill"):
        _install_kill(request["kill"])
    log = open(request.get("log") or os.devnull, "a")  # noqa: SIM115
    os.dup2(log.fileno(), 1)  # never into the zygote's reply pipe
    os.dup2(log.fileno(), 2)
    os._exit(main(request["argv"]))


def serve() -> None:
    """The zygote loop (run as ``python -m tests.helpers.resume_runs``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import kltrain.cli
    import kltrain.training.trainer  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                _child(request)
            finally:
                os._exit(99)
        _, status = os.waitpid(pid, 0)
        reply = {
            "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        }
        print(json.dumps(reply), flush=True)


class Zygote:
    """Client side: start the zygote once, then ``run(argv, kill)`` → (rc, signal)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": child_pythonpath(), "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.resume_runs"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], kill: dict | None = None, log: Path | None = None) -> dict:
        request = {"argv": argv, "kill": kill, "log": str(log) if log else None}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def write_config(
    path: Path,
    model_dir: str,
    prompts: Path,
    out: Path,
    drop: tuple[str, ...] = (),
    **sections: Any,
) -> Path:
    """A 12-step tiny run checkpointing every 3 steps, on ``prompts``; ``sections`` override,
    ``drop`` removes keys (``"kl.coef"``)."""
    raw: dict[str, Any] = {
        "name": "resume",
        "seed": 7,
        "model": {"policy": model_dir},
        "data": {"prompts": str(prompts), "chat_template": "off", "max_prompt_tokens": 16},
        "generation": {"max_new_tokens": 5},
        "reward": {
            "terms": [
                {"name": "tests.helpers.loop_rewards:letter_e_count", "transforms": ["whiten"]}
            ]
        },
        "kl": {"coef": 0.1, "adaptive": {"target": 0.5, "horizon": 20}},
        "algorithm": {"name": "grpo", "num_generations": 2, "num_minibatches": 2, "epochs": 2},
        "trainer": {
            "max_steps": 12,
            "prompts_per_step": 2,
            "micro_batch_size": 4,
            "learning_rate": 3e-3,
            "lr_schedule": "linear",
            "warmup_steps": 2,
            "output_dir": str(out),
            "save_every": 3,
            "keep_last": 1,
            "log_samples_every": 1,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    for dotted in drop:
        section, key = dotted.split(".")
        del raw[section][key]
    path.write_text(yaml.safe_dump(raw))
    return path


#: What ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` tells each process
#: (Accelerate turns the file's keys into these variables), for torchrun launches in tests:
#: FSDP2, full shard, one unit per decoder block of the tiny Llama, no mixed precision (fp32 on
#: CPU, so that runs compare with the unsharded ones at fp32 reduction-order bounds).
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
    "ACCELERATE_MIXED_PRECISION": "no",
}


#: What ``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml
#: --mixed_precision no`` tells each process (``prepare_deepspeed_cmd_env`` turns the file's keys
#: into these variables), for torchrun launches in tests: ZeRO-2, clipping at 1.0 (the default
#: trainer.max_grad_norm), no offload, fp32.
ZERO2_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
    "ACCELERATE_GRADIENT_CLIPPING": "1.0",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
    "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,gradient_accumulation_steps,gradient_clipping,"
    "offload_optimizer_device,offload_param_device,zero3_init_flag",
    "ACCELERATE_MIXED_PRECISION": "no",
}


#: The same for ``configs/accelerate/deepspeed_zero3.yaml``: ZeRO-3 (parameters partitioned
#: too), no ``deepspeed.zero.Init`` at load, no 16-bit weights on save, fp32.
ZERO3_ENV = {
    **ZERO2_ENV,
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false",
    "ACCELERATE_CONFIG_DS_FIELDS": ZERO2_ENV["ACCELERATE_CONFIG_DS_FIELDS"]
    + ",zero3_save_16bit_model",
}


def run_processes(
    argv: list[str],
    nproc: int,
    kill: dict | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """``kltrain fit`` on ``nproc`` processes (torchrun, gloo on CPU), every process installing
    the same kill hook (as a whole job dying at once: a node lost, a SIGKILL of the job); the
    launcher's exit code (non-zero when its processes were killed). ``env``: added to each
    process's environment (e.g. :data:`FSDP2_ENV`)."""
    from kltrain.training.distributed import free_port

    request = json.dumps({"argv": argv, "kill": kill, "log": str(log) if log else None})
    env = child_env(**{"OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--master_port", str(free_port()), "-m", "tests.helpers.resume_runs", "--direct"]
    with open(log or os.devnull, "a") as out:
        done = subprocess.run([*command, request], cwd=REPO, env=env, stdout=out, stderr=out)
    return done.returncode


if __name__ == "__main__":
    if sys.argv[1:2] == ["--direct"]:  # one process of a torchrun launch: no zygote, no fork
        _child(json.loads(sys.argv[2]))
    serve()
