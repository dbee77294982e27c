"""kltrain/training/fsdp.py pieces that need no second process: a one-process gloo group, in
which FSDP2 shards every parameter into a DTensor of one shard (the multi-process behaviour is
tested in tests/test_world_size.py and tests/test_resume.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from kltrain.training import checkpoint, fsdp
from kltrain.training.distributed import free_port
from tests.helpers.tiny import tiny_tied_llama


@pytest.fixture
def one_process_group():
    store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def tied_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return tiny_tied_llama(layers=2)


def test_a_sharded_tied_module_checkpoints_and_loads_back_with_its_tie(one_process_group, tmp_path):
    """f-DPG's proposal of a tied-embedding model, FSDP2-sharded: its checkpointed full state
    holds the tied weight once, as ``save_model`` would write the unsharded module, so that
    ``load_modules`` accepts it (both names in the file are refused as unexpected) and the
    loaded copy is equal and still tied."""
    model = tied_model()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    settings = fsdp.Fsdp2Settings(True, None, None, False)  # blocks by _no_split_modules, fp32
    fsdp.shard(model, model, settings)
    assert all(fsdp.is_sharded_param(p) for p in model.parameters())

    state = fsdp.full_module_state(model)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    path = checkpoint.save(
        tmp_path / "ckpt",
        step=1,
        model=tied_model(),
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        states={},
        keep_last=1,
        modules={"proposal": state},
    )
    loaded = tied_model()
    with torch.no_grad():
        for p in loaded.parameters():
            p.zero_()
    checkpoint.load_modules(path, {"proposal": loaded})
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
