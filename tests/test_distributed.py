"""Several ranks under torchrun (gloo, two CPU processes): the same steps as one process with the
accumulation multiplied by the rank count, rank 0 alone writing, resume across rank counts."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from qlora import memory
from qlora.config import load_config
from qlora.train import loop
from qlora.train.distributed import DistEnv, env_from_environ, rank_share

# Rank 1 records every write-like event under the output dir (Python audit hooks see each open
# for writing, rename, mkdir, remove) and reports them; the test wants none.
WORKER = textwrap.dedent("""
    import json, os, sys
    spec = json.loads(sys.argv[1])
    out = os.path.realpath(spec["overrides"]["output_dir"])
    seen = []

    def under(p):
        try:
            return os.path.realpath(os.fsdecode(p)).startswith(out)
        except TypeError:
            return False

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and under(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR)):
                seen.append([event, os.fsdecode(args[0])])
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir",
                       "shutil.rmtree", "os.unlink") and under(args[0]):
            seen.append([event, os.fsdecode(args[0])])

    rank = int(os.environ["RANK"])
    if rank != 0:
        sys.addaudithook(hook)
        # torch.save and safetensors write from C++/Rust, which the audit hooks do not see
        import safetensors.torch, torch

        def watch(mod, name):
            real = getattr(mod, name)

            def wrapped(obj, path, *a, **k):
                if under(path):
                    seen.append([name, os.fsdecode(path)])
                return real(obj, path, *a, **k)
            setattr(mod, name, wrapped)
        watch(torch, "save")
        watch(safetensors.torch, "save_file")
    from qlora.config import load_config
    from qlora.train import loop
    if spec.get("graph_stand_in"):
        # the loop's CUDA-graph branch on a CPU (stage, then run at the micro-batch's scale):
        # GraphedSteps' own eager fallback stands in for the replay, which computes the same
        # forward and backward of scale * loss_sum on the GPU
        from qlora.train import fast_paths
        from qlora.train.graphs import GraphedSteps

        def stand_in(model, optimizer, plan, env, sharded, device, scaler, log, max_len,
                     preference=None):
            steps = GraphedSteps.__new__(GraphedSteps)  # no CUDA pool on a CPU
            steps.model, steps.device, steps.pad_to, steps.log = model, device, 16, log
            steps.preference = preference
            steps.failed = "capture not possible on the CPU (test)"
            return steps
        fast_paths.graphed_steps = stand_in
    fail = spec.get("fail")
    if fail and rank == fail["rank"]:  # this rank runs out of memory at its n-th optimizer step
        import torch
        from qlora.train.step import Stepper

        real_update, calls = Stepper.update, []

        def update(self):
            calls.append(1)
            if len(calls) == fail["step"]:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB "
                                             "(simulated on rank %d)" % rank)
            return real_update(self)
        Stepper.update = update
    res = loop.train(load_config(None, spec["overrides"]), progress=False,
                     stop_after_steps=spec["stop_after"])
    with open(os.path.join(spec["report"], f"rank{rank}.json"), "w") as fh:
        json.dump({"losses": res.step_losses, "stopped": res.stopped, "writes": seen}, fh)
""")

FSDP_WORKER = textwrap.dedent("""
    import faulthandler; faulthandler.enable()  # a crash names its thread and frame in the log
    import json, sys, torch, torch.distributed as dist
    from qlora.adapters import AdapterConfig, attach_adapters
    from qlora.models import load_model
    from qlora.quant import QuantConfig
    from qlora.train.distributed import shard_fsdp

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = load_model(sys.argv[1], QuantConfig(method="nf4", double_quant=False,
                                                compute_dtype=torch.float32), device="cpu")
    attach_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # nonzero B, so that A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    ids = torch.randint(0, 50, (2, 24))
    pos = torch.arange(24).expand(2, 24)
    name = "model.layers.0.self_attn.q_proj.base_layer.weight"
    full_bytes = dict(model.named_parameters())[name].numel()  # uint8: one per byte
    loss = model(ids, pos, ids)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    shard_fsdp(model, torch.float32)
    local = dict(model.named_parameters())[name].to_local()
    loss2 = model(ids, pos, ids)   # the same batch on both ranks: the averaged gradient is its own
    loss2.backward()
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    opt.step()  # the states are created sharded like their parameters
    states = [s["exp_avg"] for s in opt.state.values()]
    out = {"loss": float(loss), "loss_sharded": float(loss2), "full_bytes": full_bytes,
           "local_bytes": local.numel() * local.element_size(), "dtype": str(local.dtype),
           "max_grad_diff": max(float((got[n] - want[n]).abs().max()) for n in want),
           "max_grad": max(float(want[n].abs().max()) for n in want), "n_grads": len(got),
           "state_local": sum(s.to_local().numel() for s in states),
           "state_full": sum(s.numel() for s in states)}

    # each rank reads only its rows (double quantization: the quant state needs every part)
    import bitsandbytes as bnb
    from qlora.models import load as load_module
    from qlora.train.distributed import DistEnv, row_part
    dq = QuantConfig(method="nf4", double_quant=True, compute_dtype=torch.float32)
    whole = load_model(sys.argv[1], dq, device="cpu")
    read_whole, real_read = [], load_module._read
    load_module._read = lambda h, p, k: (read_whole.append(k), real_read(h, p, k))[1]
    rank, world = dist.get_rank(), dist.get_world_size()
    part = row_part(DistEnv(rank, world, rank), torch.device("cpu"))
    mine = load_model(sys.argv[1], dq, device="cpu", part=part)
    load_module._read = real_read
    mine_params = dict(mine.named_parameters())
    rows_equal = True
    for n, p in whole.named_parameters():
        a, b = part.rows(p.shape[0])
        rows_equal &= torch.equal(mine_params[n].data[a:b], p.data[a:b])
    states_equal, n_4bit = True, 0
    for n, m in whole.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            q, w = mine.get_submodule(n).weight.quant_state, m.weight.quant_state
            states_equal &= all(torch.equal(x, y) for x, y in (
                (q.absmax, w.absmax), (q.code, w.code), (q.offset, w.offset),
                (q.state2.absmax, w.state2.absmax), (q.state2.code, w.state2.code)))
            states_equal &= (q.shape, q.dtype, q.blocksize) == (w.shape, w.dtype, w.blocksize)
            n_4bit += 1
    out.update(read_whole=read_whole, rows_equal=bool(rows_equal),
               states_equal=bool(states_equal), n_4bit=n_4bit)
    if dist.get_rank() == 0:
        open(sys.argv[2], "w").write(json.dumps(out))
    # the sharded model, its gradients and optimizer states hold the device mesh and with it the
    # process group: released before it is destroyed (as train's frame is by the time the loop
    # calls shutdown), not at interpreter exit, where gloo's threads outliving their group abort
    # the process ("terminate called without an active exception")
    del model, local, got, opt, states
    from qlora.train.distributed import DistEnv, shutdown
    shutdown(DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size()))
""")


@pytest.fixture(scope="module")
def inputs(run_inputs, tmp_path_factory):
    model, data = run_inputs
    worker = tmp_path_factory.mktemp("dist") / "worker.py"
    worker.write_text(WORKER)
    return model, data, worker


def overrides(inputs, out, **kw):
    model, data, _ = inputs
    # 13 train rows unpacked, micro-batch 2: 7 micro-batches an epoch, so the last window of
    # each epoch is short (one rank runs a weight-0 micro-batch) and 6 steps cross an epoch
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_seq_length=64,
                micro_batch_size=2, max_steps=6, learning_rate=5e-3, warmup_steps=1,
                logging_steps=1, eval_steps=3, save_steps=0, device="cpu", val_set_size=3,
                gradient_checkpointing=False, packing=False, double_quant=False, lora_dropout=0.0)
    base.update(kw)
    return base


# fp32 sums reordered: one process accumulates a step's two micro-batches in turn; two ranks each
# sum one micro-batch and the all-reduce adds the two partial sums. Each adapter-gradient element
# and each loss is a sum over the step's token positions, 2 micro-batches x 2 rows x 64 = 256 terms,
# and reordering a sum of n fp32 terms moves it by up to about n * eps relative to the sum of the
# terms' magnitudes (eps = 2^-23 = 1.19e-7): 256 * 1.19e-7 = 3.05e-5 (measured up to 1.34e-5).
# AdamW's update m / sqrt(v) carries a gradient's relative error into each step's update, and a
# weight collects at most max_steps * learning_rate = 6 * 5e-3 of updates: absolute error up to
# 6 * 5e-3 * 3.05e-5 = 9.2e-7 even where a weight nearly cancels to 0 (lora_B starts at 0).
# Tight enough for a real bug: a gradient averaged by a wrong factor of 2 is a grad_norm off by 2x,
# a wrong loss weighting a loss off by a micro-batch's share (far above 3e-5).
REORDER_REL = 256 * 1.19e-7
REORDER_ABS = 6 * 5e-3 * REORDER_REL


# timeout: stops a hung run only (a deadlocked rank), never a slow one on a loaded machine
def torchrun(args, tmp_path, timeout=3600):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def two_nodes(args, tmp_path, timeout=600):
    """`args` under 2 "nodes" x 1 process: two torchrun launchers on this machine meeting at node
    0's static rendezvous (--master-addr/--master-port), as two hosts would. [(exit code,
    output)] of node 0 and node 1. `timeout`: a guard against a hang only (the process group's
    own timeout is 30 minutes), never a measure of speed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr",
                               "127.0.0.1", "--master-port", str(port), *args],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def worker_spec(inputs, tmp_path, name, stop_after=None, **kw):
    report = tmp_path / f"report-{name}"
    report.mkdir()
    return report, {"overrides": overrides(inputs, tmp_path / name, **kw),
                    "stop_after": stop_after, "report": str(report)}


def run_worker(inputs, tmp_path, name, stop_after=None, **kw):
    report, spec = worker_spec(inputs, tmp_path, name, stop_after, **kw)
    torchrun([str(inputs[2]), json.dumps(spec)], tmp_path)
    return [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]


def train_losses(out):
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]


def grad_norms(out):
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in recs if r["split"] == "train"]


def eval_losses(out):
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["split"] == "eval"]


def tree(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


@contextmanager
def one_thread():
    """torch on one thread, as the ranks run (OMP_NUM_THREADS=1): a CPU matmul's order of sums
    depends on its thread count, and the 8-bit optimizer can turn a last-bit difference of a
    gradient into one quantization step of its state (seen: 1.9e-5 in one adapter element)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One process, accumulation 2: what two ranks with accumulation 1 must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    with one_thread():
        res = loop.train(load_config(None, overrides(inputs, out, gradient_accumulation_steps=2,
                                                     save_steps=3)), progress=False)
    return out, res


def test_two_ranks_equal_one_rank_with_double_accumulation(inputs, reference, tmp_path):
    """`qlora train` unchanged under torchrun: same per-step losses, evals and adapter; the output
    dir holds the same files, each metric once (rank 1 wrote none of them). The ranks run with
    gradient checkpointing and attention kept for backward (keep_attention), the reference
    without either: the same steps."""
    ref_out, ref = reference
    out = tmp_path / "two"
    args = [a for k, v in overrides(inputs, out, gradient_accumulation_steps=1, save_steps=3,
                                    gradient_checkpointing=True, keep_attention=True).items()
            for a in (f"--{k}", str(v))]
    proc = torchrun(["-m", "qlora.cli", "train", *args], tmp_path)
    assert proc.stdout.count("done: 6 steps") == 1  # rank 0 speaks for the run
    got, want = train_losses(out), train_losses(ref_out)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6] == sorted(ref.step_losses)
    # bounds: REORDER_REL / REORDER_ABS, derived above from the fp32 sums the two ranks reorder
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=REORDER_REL)
    assert grad_norms(out) == pytest.approx(grad_norms(ref_out), rel=REORDER_REL)  # averaging
    assert [loss for _, loss in eval_losses(out)] == pytest.approx(
        [loss for _, loss in eval_losses(ref_out)], rel=REORDER_REL)
    assert len(eval_losses(out)) == 2
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(ref_out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=REORDER_REL, atol=REORDER_ABS)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train
    assert tree(out) == tree(ref_out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 6


def test_resume_two_ranks_from_one_and_one_from_two(inputs, reference, tmp_path):
    """A 2-rank run cut at step 3 resumes on 1 rank, a 1-rank run cut at step 3 resumes on 2:
    the later steps equal the unbroken run's. Rank 1 never writes into the output dir."""
    _, ref = reference
    # 2 ranks (accumulation 1) cut after step 3, then 1 rank (accumulation 2) finishes
    r0, r1 = run_worker(inputs, tmp_path, "cut2", stop_after=3, gradient_accumulation_steps=1)
    assert r0["stopped"] == r1["stopped"] == "interrupted"
    assert r1["writes"] == []
    assert sorted(int(s) for s in r0["losses"]) == [1, 2, 3]
    resumed = loop.train(load_config(None, overrides(inputs, tmp_path / "cut2", resume="latest",
                                                     gradient_accumulation_steps=2)),
                         progress=False)
    assert sorted(resumed.step_losses) == [4, 5, 6]
    for step in range(4, 7):
        assert resumed.step_losses[step] == pytest.approx(ref.step_losses[step], rel=1e-5)

    # 1 rank cut after step 3, then 2 ranks finish
    cut = loop.train(load_config(None, overrides(inputs, tmp_path / "cut1",
                                                 gradient_accumulation_steps=2)),
                     progress=False, stop_after_steps=3)
    assert cut.stopped == "interrupted"
    r0, r1 = run_worker(inputs, tmp_path, "cut1", resume="latest", gradient_accumulation_steps=1)
    assert r1["writes"] == [] and r0["stopped"] == "completed"
    assert sorted(int(s) for s in r0["losses"]) == [4, 5, 6]
    for step in range(4, 7):
        assert r0["losses"][str(step)] == pytest.approx(ref.step_losses[step], rel=1e-5)
        assert r1["losses"][str(step)] == r0["losses"][str(step)]  # all-reduced: every rank agrees
    assert [s for s, _ in train_losses(tmp_path / "cut1")] == [1, 2, 3, 4, 5, 6]


# 2 ranks x accumulation 2 against 1 process x accumulation 4: one process adds a step's four
# micro-batch gradients in turn, the ranks two each and the all-reduce the two partial sums. Each
# adapter-gradient element and each loss is a sum over 4 micro-batches x 3 rows x 64 positions =
# 768 terms; reordering moves it by up to 768 * 1.19e-7 = 9.1e-5 relative (see REORDER_REL), and
# torch AdamW carries that into each update: a weight moves by at most 6 steps x lr 5e-3 of
# updates, so absolute error up to 6 * 5e-3 * 9.1e-5. (The 8-bit optimizer is left out here: a
# reordering-sized change of a gradient can move its 8-bit state by a whole quantization step;
# the accumulation-1 test above runs it, where the sums are the same sums.)
ACCUM_REL = 768 * 1.19e-7
ACCUM_ABS = 6 * 5e-3 * ACCUM_REL
CLIP = 0.05  # below every step's gradient norm in this run: each step is clipped


def test_two_nodes_accumulate_and_clip_like_one_process(inputs, tmp_path):
    """Data parallel as the GPU runs it: 2 "nodes" x 1 process (two torchrun launchers, static
    rendezvous), each rank 2 micro-batches of 3 per step through the loop's CUDA-graph branch
    (on a CPU its eager stand-in), no communication until the one gradient all-reduce, then
    clipping and AdamW: the steps, evals and adapter of 1 process with accumulation 4. 5
    micro-batches an epoch: the second window of each epoch leaves rank 1 a weight-0 one."""
    kw = dict(micro_batch_size=3, optim="adamw_torch", max_grad_norm=CLIP)
    with one_thread():
        want = loop.train(load_config(None, overrides(inputs, tmp_path / "one",
                                                      gradient_accumulation_steps=4, **kw)),
                          progress=False)
    report, spec = worker_spec(inputs, tmp_path, "two", gradient_accumulation_steps=2, **kw)
    spec["graph_stand_in"] = True
    runs = two_nodes([str(inputs[2]), json.dumps(spec)], tmp_path)
    assert [rc for rc, _ in runs] == [0, 0], runs[0][1][-3000:] + runs[1][1][-3000:]
    got = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["losses"] == got[1]["losses"]  # all-reduced: every rank agrees
    out, ref_out = tmp_path / "two", tmp_path / "one"
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4, 5, 6]
    # bounds: ACCUM_REL / ACCUM_ABS above
    assert [x for _, x in train_losses(out)] == pytest.approx(
        [x for _, x in train_losses(ref_out)], rel=ACCUM_REL)
    assert grad_norms(out) == pytest.approx(grad_norms(ref_out), rel=ACCUM_REL)
    assert min(grad_norms(ref_out)) > CLIP  # clipping acted at every step
    assert [x for _, x in eval_losses(out)] == pytest.approx(
        [x for _, x in eval_losses(ref_out)], rel=ACCUM_REL)
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(ref_out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=ACCUM_REL, atol=ACCUM_ABS)
    assert want.step_losses.keys() == {1, 2, 3, 4, 5, 6}


def test_a_failing_rank_ends_every_rank_with_its_message(inputs, tmp_path):
    """Rank 1 (node 1 of 2) runs out of memory (simulated) at its second optimizer step, while
    rank 0 waits in the gradient all-reduce: both launchers end with a nonzero code, and rank 1's
    message reaches rank 0's output too; two_nodes' guard (10 min) is far under the process
    group's 30-minute timeout, which a waiting rank would otherwise sit out."""
    report, spec = worker_spec(inputs, tmp_path, "fail", gradient_accumulation_steps=1)
    spec["fail"] = {"rank": 1, "step": 2}
    (rc0, out0), (rc1, out1) = two_nodes([str(inputs[2]), json.dumps(spec)], tmp_path)
    assert rc0 != 0 and rc1 != 0
    assert "out of GPU memory during training" in out1 and "simulated on rank 1" in out1
    assert "rank 0 stops: rank 1 failed" in out0 and "simulated on rank 1" in out0
    assert not list(report.iterdir())  # neither rank finished


def test_fsdp_shards_the_4bit_base_and_steps_like_one_process(inputs, tmp_path):
    """The sharded building block: NF4 bytes re-stored as float32 and fully_shard-ed over 2 ranks;
    each rank keeps half the bytes, and loss and adapter gradients equal the unsharded model's.
    The sharded loader: each rank reads no tensor whole (only its rows, through safetensors
    slices), and its rows (4-bit bytes, embeddings, norms) and every quant state (double
    quantization) equal those of the model read whole."""
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    report = tmp_path / "fsdp.json"
    torchrun([str(worker), str(inputs[0]), str(report)], tmp_path)
    r = json.loads(report.read_text())
    assert r["dtype"] == "torch.float32" and r["local_bytes"] * 2 == r["full_bytes"]
    assert r["loss_sharded"] == pytest.approx(r["loss"], rel=1e-6)
    assert r["n_grads"] > 0 and r["max_grad"] > 0
    assert r["max_grad_diff"] <= 1e-5 * r["max_grad"]
    assert r["state_local"] * 2 == r["state_full"]  # optimizer states: half on each rank
    # a rank reading only the rows it keeps gets the whole-read model's rows and quant states
    assert r["read_whole"] == [] and r["n_4bit"] > 0
    assert r["rows_equal"] and r["states_equal"]


METRICS_WORKER = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from qlora.train.distributed import env_from_environ, metric_sums_on_host

    dist.init_process_group("gloo")
    env = env_from_environ()
    r = env.rank
    # each rank's own fp32 sums, named in another order than sorted
    sums = {"rewards/margins": torch.tensor([0.1 if r else 1 / 3, 3.0 + r]),
            "kl": torch.tensor([2.0 ** -30 * (r + 1), 1.0])}
    got = metric_sums_on_host(env, sums, torch.device("cpu"))
    with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as fh:
        json.dump({k: [v.dtype == torch.float32, v.device.type, v.tolist()]
                   for k, v in got.items()}, fh)
    dist.destroy_process_group()
""")


def test_metric_sums_are_summed_over_the_ranks_in_one_all_reduce(tmp_path):
    """A preference step's metric sums (and an evaluation's) over two ranks: every rank gets the
    fp64 sum of each entry, on the host, as fp32 (the dtype the one-rank sums have)."""
    script = tmp_path / "worker.py"
    script.write_text(METRICS_WORKER)
    torchrun([str(script), str(tmp_path)], tmp_path, timeout=600)
    # summed in fp64, as all_reduce_sum sums, then fp32 again
    third, tenth = float(torch.tensor(1 / 3)), float(torch.tensor(0.1))  # the ranks' fp32 values
    want = {"rewards/margins": [True, "cpu", [float(torch.tensor(third + tenth)), 7.0]],
            "kl": [True, "cpu", [3 * 2.0 ** -30, 2.0]]}
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == want, r


# --- pieces that need no second process ------------------------------------------------------------
def test_environment_and_shares():
    assert env_from_environ({}) == DistEnv() and not DistEnv().enabled
    env = env_from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (1, 2, 1, False)
    window = [10, 11, 12, 13, 14]
    shares = [rank_share(window, DistEnv(r, 2, r)) for r in (0, 1)]
    assert shares == [[10, 12, 14], [11, 13]]
    assert sorted(shares[0] + shares[1]) == window


def test_plan_divides_what_each_mode_shards():
    arch = memory.resolve_arch(shape="llama-3-8b")
    one = memory.plan(arch, memory.PlanConfig())
    ddp = memory.plan(arch, replace(memory.PlanConfig(), gpus=2, sharding="ddp"))
    fsdp = memory.plan(arch, replace(memory.PlanConfig(), gpus=2, sharding="fsdp"))
    # a sharded run steps with torch AdamW (bitsandbytes' optimizers do not take DTensor shards)
    one_adamw = memory.plan(arch, replace(memory.PlanConfig(), optimizer="adamw_torch"))
    # data parallel: every rank holds everything, as one GPU; the gradients are summed in place
    # (no bucket copy)
    assert (ddp.base, ddp.adapters, ddp.optimizer, ddp.activations, ddp.adapter_grads) == (
        one.base, one.adapters, one.optimizer, one.activations, one.adapter_grads)
    # FSDP: base, embeddings, adapters, grads and optimizer states halve; activations do not
    for part in ("base", "embeddings", "adapters", "adapter_grads"):
        assert getattr(fsdp, part) == -(-getattr(one, part) // 2), part
    for part in ("optimizer", "optimizer_paged"):
        assert getattr(fsdp, part) == -(-getattr(one_adamw, part) // 2), part
    assert one_adamw.optimizer > one.optimizer + one.optimizer_paged  # fp32 states, not 8-bit
    assert fsdp.activations == one.activations and fsdp.workspace > one.workspace
    # a 70B base does not fit one 24 GiB card, and sharding over enough ranks is what plan advises
    big = memory.resolve_arch(shape="llama-2-70b")
    (advice,) = memory.advise(big, memory.PlanConfig(), 24 * memory.GiB)
    assert "fsdp" in advice.text.lower()


def test_failure_watch_ends_a_rank_with_the_first_failure_of_another(monkeypatch, capsys):
    """FailureWatch against a real TCP store, in one process: a rank ends (exit code 1, the
    failed rank's message) when another rank's failure appears in the store, keeps only the first
    failure, and never ends itself over its own announcement."""
    import threading

    import torch.distributed as dist

    from qlora.train.distributed import PEER_FAILED_EXIT, FailureWatch

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    ended, codes = threading.Event(), []

    def fake_exit(code):
        codes.append(code)
        ended.set()

    with FailureWatch(DistEnv(0, 2, 0), interval=0.01, exit=fake_exit) as rank0, \
            FailureWatch(DistEnv(1, 2, 1), interval=0.01, exit=fake_exit) as rank1:
        assert rank1.announce(RuntimeError("bad batch")) == "rank 1 failed: RuntimeError: bad batch"
        assert ended.wait(timeout=60)  # a guard against a hang, not a measure of speed
        # a later failure (usually a consequence) does not replace the first
        assert rank0.announce(RuntimeError("connection closed")).startswith("rank 1 failed")
    assert codes == [PEER_FAILED_EXIT]  # rank 0 ended; rank 1 did not end over its own
    assert "error: rank 0 stops: rank 1 failed: RuntimeError: bad batch" in capsys.readouterr().err
