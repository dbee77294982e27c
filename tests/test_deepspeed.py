"""DeepSpeed (issue 11): the Accelerate launch configurations turn into the DeepSpeed plugin they
describe, and a dry run builds the ZeRO-2 and ZeRO-3 engines from them on the tiny model in one
process (CPU: gloo; a lent GPU: NCCL) and in two (CPU, torchrun; ``multiprocess``) and takes one
optimizer step that matches a plain torch AdamW step on an identical copy of the model. Under
ZeRO-3 the chunked lm_head path gets the plain gradients once it runs inside a module forward
that has the lm_head weight registered (``ChunkedHead``): the way to wire the loop to it.

kltrain's loop runs both (``kltrain/training/deepspeed_engine.py``, tested against one process
in ``tests/test_world_size.py``; the loop's ZeRO-3 lm_head loss is wired as ``ChunkedHead``
shows): these tests pin what the configurations mean and that both engines start.

Tolerances (fp32; ``tests/conftest.py`` has the error model):

- Loss: the engine runs the same forward on the same weights, but ZeRO-3 gathers them into fresh
  buffers, so a BLAS kernel may block the sums differently: forward roundoff of a depth × width
  network, through log-softmax (2-Lipschitz), averaged over tokens (``step_one_divergence_tol``
  with one token), plus each evaluation's rounding of the log-sum-exp and the token mean.
- Gradients: each entry is a chain of N roundings (a sum over the batch's tokens, over each
  layer's hidden + MLP width, over the vocabulary at the output, and the average over processes);
  its error is bounded by ``γ_N`` times the absolute sum of its terms, which is stated as the
  number of tokens times the tensor's largest entry (terms of both signs, one per token):
  :func:`grad_rtol`, compared with ``assert_close_to_scale``.
- Weights after one AdamW step: step 1's update is ``lr·ĝ/(|ĝ| + ε)`` (bias-corrected moments
  m̂ = ĝ, v̂ = ĝ²), ĝ the clipped gradient. A gradient error δ moves it by at most
  ``lr·δ/(|ĝ| − δ + ε)`` (≤ 2·lr where δ ≥ |ĝ|: the sign of a roundoff-level entry decides a
  full step), so the bound is per entry, from the gradient bound, plus a few ulp of θ for the
  decay and the subtraction. A wrong gradient (missing reduction, a partition applied twice) or a
  missed step moves entries by ~lr, far above it where |ĝ| ≫ δ.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import yaml

from kltrain.training.distributed import free_port
from tests.conftest import assert_close_to_scale, fp32_tol, step_one_divergence_tol
from tests.helpers.resume_runs import REPO

ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
DEEPSPEED_CONFIGS = ("deepspeed_zero2", "deepspeed_zero3")

# The tiny model of the dry run: 2 layers, hidden 16, MLP 32, vocabulary 64; a batch of 2 × 8.
DEPTH, HIDDEN, MLP, VOCAB = 2, 16, 32, 64
BATCH, SEQ = 2, 8
LR, WEIGHT_DECAY, ADAM_EPS, MAX_GRAD_NORM = 1e-2, 0.1, 1e-8, 1.0


def grad_rtol(tokens: int, processes: int = 1) -> float:
    """Bound on two evaluations of a gradient over ``tokens`` tokens (module docstring): a chain
    of tokens + depth·(hidden + MLP) + vocabulary roundings, plus the average over the processes,
    with condition number ``tokens``; each evaluation within it, so twice."""
    return 2 * fp32_tol(tokens + DEPTH * (HIDDEN + MLP) + VOCAB + processes, tokens)


GRAD_RTOL = grad_rtol(BATCH * SEQ)
#: Random-init logits of the tiny model are far below 1 in magnitude (init std 0.02).
LOGIT_TOL = step_one_divergence_tol(1, DEPTH, HIDDEN + MLP, 1.0)


def plugin_from_accelerate_config(name: str, *launch_args: str):
    """The DeepSpeedPlugin that ``accelerate launch --config_file configs/accelerate/NAME.yaml``
    hands each process: the launcher (Accelerate's own parser, validation and
    ``prepare_deepspeed_cmd_env``) turns the file into ``ACCELERATE_*`` variables, and
    ``DeepSpeedPlugin()`` and the Accelerator's mixed-precision setting read them back."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), *launch_args, "train.py"])
    args, defaults, mixed_precision_from_file = _validate_launch_command(args)
    assert args.use_deepspeed, f"{path} does not launch DeepSpeed"
    # what `accelerate launch` sets before calling its DeepSpeed launcher (commands/launch.py)
    fields = [*defaults.deepspeed_config, *(["mixed_precision"] * mixed_precision_from_file)]
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    accelerate_env = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
    with patch_environment(**accelerate_env):
        plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(accelerate_env["ACCELERATE_MIXED_PRECISION"])
    return plugin


@pytest.mark.parametrize("name", DEEPSPEED_CONFIGS)
def test_deepspeed_configs_become_the_plugin_they_describe(name, monkeypatch):
    """Zero stage, clipping, precision, offload and the ZeRO-3 flags as the file says. The plugin
    is built with DeepSpeed unimportable: reading a configuration needs only Accelerate."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    raw = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())
    file = raw["deepspeed_config"]
    plugin = plugin_from_accelerate_config(name)
    ds = plugin.deepspeed_config
    zero = ds["zero_optimization"]

    assert plugin.zero_stage == zero["stage"] == file["zero_stage"] == int(name[-1])
    assert plugin.gradient_clipping == ds["gradient_clipping"] == file["gradient_clipping"]
    assert ds["gradient_accumulation_steps"] == file["gradient_accumulation_steps"]
    precision = raw["mixed_precision"]
    assert precision == "no"  # kltrain runs DeepSpeed in fp32 only
    assert ds["bf16"] == {"enabled": precision == "bf16"}
    assert ds["fp16"] == {"enabled": precision == "fp16"}
    assert zero["offload_optimizer"]["device"] == file["offload_optimizer_device"]
    assert zero["offload_param"]["device"] == file["offload_param_device"]
    assert plugin.zero3_init_flag is file["zero3_init_flag"] is False  # kltrain refuses true
    save_16bit = file.get("zero3_save_16bit_model", False)
    assert zero["stage3_gather_16bit_weights_on_model_save"] is save_16bit
    # the command line overrides the file, as `accelerate launch --mixed_precision no` does
    plain = plugin_from_accelerate_config(name, "--mixed_precision", "no")
    assert plain.deepspeed_config["bf16"] == {"enabled": False}


# ----------------------------------------------------------------------------------------------
# Dry run: the engine from each configuration, one step, against plain torch


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)


@pytest.fixture(scope="module")
def deepspeed_world():
    """(deepspeed, device): a one-process group on the accelerator DeepSpeed detects ('cpu':
    gloo, 'cuda': NCCL), shared by this module's engines (DeepSpeed caches its groups) and torn
    down after, so no other test sees a process group or DeepSpeed's globals.

    On CPU, DeepSpeed compiles its shared-memory all-reduce (``deepspeed_shm_comm``, C++, ~20 s
    with g++ on this machine) whenever it starts its communication backend; only inference
    tensor-parallel all-reduces across several local processes use it, never a training step
    and never one process, so it is left unbuilt here."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import groups

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
        mp.setattr(ds_comm, "cdb", None)
        mp.setattr(groups, "_WORLD_GROUP", None)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            mp.setenv(key, value)
        mp.setenv("MASTER_ADDR", "127.0.0.1")
        mp.setenv("MASTER_PORT", str(free_port()))
        accelerator = get_accelerator()
        torch.distributed.init_process_group(accelerator.communication_backend_name())
        try:
            yield deepspeed, accelerator.device_name()
        finally:
            torch.distributed.destroy_process_group()


def engine_config(plugin) -> dict:
    """The plugin's DeepSpeed config as the engine gets it: the micro-batch size Accelerate's
    prepare() fills from the data loader, and every ZeRO-3 parameter sharded (DeepSpeed keeps
    parameters under 1e5 elements whole on each process by default: all of the tiny model's,
    but only norms and biases of a real one)."""
    config = copy.deepcopy(plugin.deepspeed_config)
    config["train_micro_batch_size_per_gpu"] = BATCH
    config.pop("train_batch_size")
    if plugin.zero_stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def dry_run(name: str, deepspeed, device: str, rank: int = 0, processes: int = 1) -> None:
    """Build the engine of configs/accelerate/NAME.yaml (fp32: launched with
    ``--mixed_precision no``, so it compares with plain fp32 torch) on the tiny model, take one
    step on this process's share of the batch, and check loss, gradients, gradient norm,
    partitioning (ZeRO-3) and the new weights against a plain clip + AdamW step on an identical
    copy fed the whole batch (every process's share has as many tokens, so the whole batch's
    mean loss is the mean of the processes' losses, and its gradient their average)."""
    from deepspeed.utils import safe_get_full_grad, safe_get_full_optimizer_state

    plugin = plugin_from_accelerate_config(name, "--mixed_precision", "no")
    config = engine_config(plugin)
    assert config["gradient_clipping"] == MAX_GRAD_NORM

    model = tiny_llama()
    reference = copy.deepcopy(model).to(device)
    shape = (BATCH * processes, SEQ)
    everyone = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(1))
    everyone = everyone.to(device)
    ids = everyone[rank * BATCH : (rank + 1) * BATCH]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=adamw(model.parameters()), config=config
    )
    assert engine.zero_optimization_stage() == plugin.zero_stage
    assert engine.dp_world_size == processes
    stage3 = plugin.zero_stage == 3
    if stage3:
        check_partitioned(engine.module, shapes, processes)

    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    with torch.no_grad():
        want_loss = reference(input_ids=ids, labels=ids).loss
    # logits' roundoff through log-softmax, plus each evaluation's own rounding of the
    # log-sum-exp over the vocabulary and the mean over the tokens (≤ γ_n of the loss)
    loss_tol = LOGIT_TOL + 2 * fp32_tol(VOCAB + BATCH * SEQ) * want_loss.item()
    assert abs(loss.item() - want_loss.item()) <= loss_tol
    reference(input_ids=everyone, labels=everyone).loss.backward()

    rtol = grad_rtol(BATCH * SEQ * processes, processes)
    ref_params = dict(reference.named_parameters())
    for n, p in engine.module.named_parameters():
        want = ref_params[n].grad
        assert_close_to_scale(safe_get_full_grad(p), want, rtol, msg=f"grad {n}")
    grads = {n: p.grad.detach().clone() for n, p in ref_params.items()}

    engine.step()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_GRAD_NORM)
    # clipping active, by more than 5%: a skipped clip moves exp_avg far beyond its tolerance
    assert norm > 1.05 * MAX_GRAD_NORM
    # the engine's norm is the one it clipped with: a sum of n_params squares, then √
    n_params = sum(p.numel() for p in reference.parameters())
    norm_rtol = fp32_tol(n_params + 1) + rtol
    assert engine.get_global_grad_norm() == pytest.approx(norm.item(), rel=norm_rtol)
    before = {n: p.detach().clone() for n, p in ref_params.items()}
    ref_optimizer = adamw(reference.parameters())
    ref_optimizer.step()

    # step 1's first moment is (1 − β1)·ĝ: the clipped gradient, which the update alone hides
    # (m̂/√v̂ does not change when ĝ is scaled); ĝ's error is g's plus the clip factor's
    for n, p in engine.module.named_parameters():
        want = ref_optimizer.state[ref_params[n]]["exp_avg"]
        got = safe_get_full_optimizer_state(p, "exp_avg")
        assert_close_to_scale(got, want, rtol + 2 * norm_rtol, msg=f"exp_avg {n}")

    got = full_weights(deepspeed, engine.module, stage3)
    for n, want in ref_params.items():
        check_adam_step(got[n], want.detach(), before[n], grads[n], norm, rtol + 2 * norm_rtol, n)
    if stage3:
        check_partitioned(engine.module, shapes, processes)  # released after step and gather


def check_partitioned(module, shapes: dict[str, tuple], processes: int) -> None:
    """ZeRO-3: each parameter's storage on a process is its shard ``ds_tensor``, ⌈numel/processes⌉
    elements (the last one padded), and outside a forward (or a gather) the parameter itself holds
    no elements."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for name, p in module.named_parameters():
        assert p.ds_status == ZeroParamStatus.NOT_AVAILABLE, name
        assert p.numel() == 0, f"{name}: {tuple(p.shape)} outside a gather"
        assert tuple(p.ds_shape) == shapes[name], f"{name}: ds_shape {tuple(p.ds_shape)}"
        shard = -(-p.ds_numel // processes)
        assert p.ds_tensor.numel() == shard, f"{name}: shard {p.ds_tensor.numel()} ≠ {shard}"


def full_weights(deepspeed, module, stage3: bool) -> dict[str, torch.Tensor]:
    """The engine's full parameters: under ZeRO-3 through ``GatheredParameters`` (the lm_head
    weight among them, the tensor the chunked lm_head path reads outside forward)."""
    params = dict(module.named_parameters())
    if not stage3:
        return {n: p.detach().clone() for n, p in params.items()}
    full = {}
    for n, p in params.items():
        with deepspeed.zero.GatheredParameters([p]):
            full[n] = p.detach().clone()
        assert p.numel() == 0, f"{n} still gathered after the context"
    assert module.get_output_embeddings().weight is params["lm_head.weight"]
    assert tuple(full["lm_head.weight"].shape) == (VOCAB, HIDDEN)
    return full


def check_adam_step(got, want, before, grad, norm, rtol: float, name: str) -> None:
    """One AdamW step, per entry: ``|θ_ds − θ_ref| ≤ lr·δ/(|ĝ| − δ + ε)`` (at most 2·lr) plus
    8 ulp of θ; ĝ = g·min(1, max_norm/‖g‖) and δ = rtol·(|ĝ| + max|ĝ|) its error bound (the
    gradient's, at this tensor's scale, plus the clip factor's)."""
    got, want, before, grad = (t.detach().double().cpu() for t in (got, want, before, grad))
    clipped = grad * min(1.0, MAX_GRAD_NORM / (float(norm) + 1e-6))
    delta = rtol * (clipped.abs() + clipped.abs().max())
    margin = (clipped.abs() - delta).clamp_min(0) + ADAM_EPS
    tol = LR * torch.clamp(delta / margin, max=2.0) + 8 * 2.0**-24 * before.abs()
    assert got.shape == want.shape, name
    assert ((want - before).abs() > LR / 2).any(), f"{name}: the reference did not move"
    excess = (got - want).abs() - tol
    assert (excess <= 0).all(), f"{name}: {int((excess > 0).sum())} entries off, max {excess.max()}"


@pytest.mark.parametrize("name", DEEPSPEED_CONFIGS)
def test_deepspeed_engine_step_matches_plain_adamw(name, deepspeed_world):
    """On the accelerator DeepSpeed detects: the CPU here and in CI, the GPU on a lent device."""
    dry_run(name, *deepspeed_world)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deepspeed_zero3_step_matches_plain_adamw_on_cuda(deepspeed_world):
    """For a lent GPU (NCCL, one process): the ZeRO-3 dry run and the chunked lm_head check on
    CUDA, where DeepSpeed is meant to run."""
    deepspeed, device = deepspeed_world
    assert device == "cuda", f"DeepSpeed chose {device!r} on a machine with CUDA"
    dry_run("deepspeed_zero3", deepspeed, device)
    chunked_lm_head_run(deepspeed, device)


# ----------------------------------------------------------------------------------------------
# The chunked lm_head path under ZeRO-3


class ChunkedHead(torch.nn.Module):
    """kltrain's chunked lm_head loss (``fused_token_loss``) inside a module's forward. ZeRO-3
    gathers a parameter only for the forward and backward of a module that owns it (or has it
    registered as an external parameter); the trainer reads the lm_head weight outside any
    forward, where ZeRO-3 hands out an empty tensor. Holds the owner in a list so the lm_head
    is not registered twice (its weight stays one parameter of the model)."""

    def __init__(self, owner: torch.nn.Module):
        super().__init__()
        self._owner = [owner]

    def forward(self, hidden, tokens):
        from kltrain.divergence.lm_head import fused_token_loss

        weight = self._owner[0].weight
        return fused_token_loss(hidden, weight, tokens, lambda c: -c.logprobs.sum() / len(tokens))


def test_zero3_chunked_lm_head_needs_the_weight_gathered_and_then_matches(deepspeed_world):
    """Read outside forward (as the trainer does now) the ZeRO-3 lm_head weight is empty and the
    chunked path refuses it; called inside a module forward with the weight registered as that
    module's external parameter, loss and gradients are the plain ones."""
    chunked_lm_head_run(*deepspeed_world)


def chunked_lm_head_run(deepspeed, device: str, rank: int = 0, processes: int = 1) -> None:
    """The test above on this process's share of the batch (see :func:`dry_run`)."""
    from deepspeed.utils import safe_get_full_grad

    from kltrain.divergence.lm_head import fused_token_loss
    from kltrain.models.logits import final_hidden_states, lm_head_params

    config = engine_config(
        plugin_from_accelerate_config("deepspeed_zero3", "--mixed_precision", "no")
    )
    model = tiny_llama()
    reference = copy.deepcopy(model).to(device)
    model.chunked_head = ChunkedHead(model.lm_head)  # no parameters of its own
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=adamw(model.parameters()), config=config
    )
    deepspeed.zero.register_external_parameter(engine.module.chunked_head, model.lm_head.weight)

    shape = (BATCH * processes, SEQ)
    everyone = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(2))
    everyone = everyone.to(device)
    ids = everyone[rank * BATCH : (rank + 1) * BATCH]

    def hidden(m, rows):
        mask = torch.ones_like(rows)
        return final_hidden_states(m, rows, mask)[:, :-1].reshape(-1, HIDDEN)

    def mean_nll(chunk):
        return -chunk.logprobs.sum() / chunk_tokens

    weight, _ = lm_head_params(engine.module)
    assert weight.numel() == 0
    targets = ids[:, 1:].reshape(-1)
    chunk_tokens = len(targets)
    with pytest.raises(ValueError, match=r"weight \[V, H\], got .* and \(0,\)"):
        fused_token_loss(hidden(engine.module, ids), weight, targets, mean_nll)

    loss = engine.module.chunked_head(hidden(engine.module, ids), targets)
    assert model.lm_head.weight.numel() == 0  # released after the forward
    engine.backward(loss)
    with torch.no_grad():
        want = fused_token_loss(hidden(reference, ids), reference.lm_head.weight, targets, mean_nll)
    loss_tol = LOGIT_TOL + 2 * fp32_tol(VOCAB + BATCH * SEQ) * want.item()
    assert abs(loss.item() - want.item()) <= loss_tol

    all_targets = everyone[:, 1:].reshape(-1)
    chunk_tokens = len(all_targets)
    whole = hidden(reference, everyone)
    fused_token_loss(whole, reference.lm_head.weight, all_targets, mean_nll).backward()
    rtol = grad_rtol(BATCH * SEQ * processes, processes)
    for n, p in engine.module.named_parameters():
        want_grad = dict(reference.named_parameters())[n].grad
        assert_close_to_scale(safe_get_full_grad(p), want_grad, rtol, msg=f"grad {n}")
    engine.step()


@pytest.mark.multiprocess
def test_deepspeed_engines_over_two_cpu_processes_match_plain_adamw(tmp_path):
    """The dry run over 2 processes (torchrun, gloo): ZeRO-3 shards each parameter in halves,
    the gradient is the average of the processes' and the step is the whole batch's."""
    import subprocess

    from tests.helpers.launch import assert_launch_ok, child_env

    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(free_port()), "tests/helpers/deepspeed_worker.py"),
    ]
    env = child_env(OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_launch_ok(done)
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout
