"""`qlora train --sharding fsdp` under torchrun (gloo, two CPU processes): the 4-bit base, adapters
and optimizer states sharded with FSDP2, and still the steps, evals, adapter and checkpoints of one
process with the accumulation doubled; resume from and into a sharded run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import inputs, overrides, run_worker, torchrun, train_losses, tree  # noqa: F401

from qlora.config import load_config
from qlora.errors import QloraError
from qlora.train import loop
from qlora.train.distributed import SINGLE, DistEnv, check_sharding, micro_batches


def eval_losses(out):
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [loss for r in recs if r["split"] == "eval" for loss in [r["loss"]]]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):  # noqa: F811
    """One process, accumulation 2, torch AdamW (what a sharded run uses)."""
    out = tmp_path_factory.mktemp("ref-fsdp") / "run"
    res = loop.train(load_config(None, overrides(inputs, out, gradient_accumulation_steps=2,
                                                 save_steps=3, optim="adamw_torch")),
                     progress=False)
    return out, res


def test_fsdp_two_ranks_equal_one_rank_with_double_accumulation(inputs, reference, tmp_path):  # noqa: F811
    """The real CLI under torchrun, sharded, with gradient checkpointing, attention kept for
    backward (keep_attention) and the default (8-bit) optimizer, which is replaced by torch AdamW
    with a note: same losses, evals, adapter (which peft loads), the same files as one process."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    ref_out, ref = reference
    out = tmp_path / "fsdp"
    args = [a for k, v in overrides(inputs, out, gradient_accumulation_steps=1, save_steps=3,
                                    sharding="fsdp", gradient_checkpointing=True,
                                    keep_attention=True).items()
            for a in (f"--{k}", str(v))]
    proc = torchrun(["-m", "qlora.cli", "train", *args], tmp_path)
    assert proc.stdout.count("done: 6 steps") == 1
    assert "--sharding fsdp uses adamw_torch" in proc.stdout
    got, want = train_losses(out), train_losses(ref_out)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-5)
    assert eval_losses(out) == pytest.approx(eval_losses(ref_out), rel=1e-5)
    assert tree(out) == tree(ref_out)
    for rel in ("adapter_model.safetensors", "checkpoints/step-00000003/trainable.safetensors"):
        a, b = load_file(str(out / rel)), load_file(str(ref_out / rel))
        assert a.keys() == b.keys()
        scale = max(float(t.abs().max()) for t in b.values())
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5 * scale)
    # the checkpoint's optimizer state is a single process's (whole tensors, same layout)
    oa = torch.load(out / "checkpoints/step-00000003/optimizer.pt", weights_only=True)
    ob = torch.load(ref_out / "checkpoints/step-00000003/optimizer.pt", weights_only=True)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, st in ob["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(oa["state"][i][k], v, rtol=1e-4, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["optimizer"] == "adamw_torch"

    hf = AutoModelForCausalLM.from_pretrained(str(inputs[0]), dtype=torch.float32)
    peft_state = get_peft_model_state_dict(PeftModel.from_pretrained(hf, str(out)))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert peft_state.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(peft_state[key], value)
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)


def test_fsdp_resume_from_and_into_one_process(inputs, reference, tmp_path):  # noqa: F811
    """A sharded run cut at step 3 finishes on 1 process; a 1-process run cut at step 3 finishes
    sharded on 2 ranks: steps 4-6 equal the unbroken run's; rank 1 writes nothing."""
    _, ref = reference
    r0, r1 = run_worker(inputs, tmp_path, "cut2", stop_after=3, gradient_accumulation_steps=1,
                        sharding="fsdp", optim="adamw_torch")
    assert r0["stopped"] == r1["stopped"] == "interrupted" and r1["writes"] == []
    resumed = loop.train(load_config(None, overrides(inputs, tmp_path / "cut2", resume="latest",
                                                     gradient_accumulation_steps=2,
                                                     optim="adamw_torch")), progress=False)
    assert sorted(resumed.step_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.step_losses[step] == pytest.approx(ref.step_losses[step], rel=1e-5)

    cut = loop.train(load_config(None, overrides(inputs, tmp_path / "cut1", optim="adamw_torch",
                                                 gradient_accumulation_steps=2)),
                     progress=False, stop_after_steps=3)
    assert cut.stopped == "interrupted"
    r0, r1 = run_worker(inputs, tmp_path, "cut1", resume="latest", gradient_accumulation_steps=1,
                        sharding="fsdp", optim="adamw_torch")
    assert r1["writes"] == [] and r0["stopped"] == "completed"
    for step in (4, 5, 6):
        assert r0["losses"][str(step)] == pytest.approx(ref.step_losses[step], rel=1e-5)
        assert r1["losses"][str(step)] == r0["losses"][str(step)]


def test_sharding_choice_and_lockstep_shares():
    assert check_sharding("fsdp", SINGLE) is False  # one process: nothing to shard
    assert check_sharding("ddp", DistEnv(0, 2, 0)) is False
    assert check_sharding("fsdp", DistEnv(0, 2, 0)) is True
    with pytest.raises(QloraError, match="use_dora"):
        check_sharding("fsdp", DistEnv(1, 2, 1), use_dora=True)
    window = [4, 5, 6]  # a short window: rank 1 has one micro-batch, rank 0 two
    ddp = [micro_batches(window, DistEnv(r, 2, r), lockstep=False) for r in (0, 1)]
    fsdp = [micro_batches(window, DistEnv(r, 2, r), lockstep=True) for r in (0, 1)]
    assert ddp == [[(4, 1), (6, 1)], [(5, 1)]]
    assert fsdp == [[(4, 1), (6, 1)], [(5, 1), (4, 0)]]  # padded with a weight-0 micro-batch
    assert micro_batches([7], DistEnv(1, 2, 1), lockstep=False) == [(7, 0)]
