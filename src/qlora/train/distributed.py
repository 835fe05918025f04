"""Several processes, one run: `qlora train` under `torchrun --nproc-per-node N`.

Data parallel over the adapters (`--sharding ddp`, the default). Every rank holds the whole model
and runs its micro-batches without any communication (on CUDA as replayed graphs, train/graphs.py);
then the trainable gradients, which live in one flat buffer per parameter group
(optim.flatten_group), are summed over the ranks in place, ONCE per optimizer step
(`all_reduce_grads`), and every rank clips and steps the same optimizer on the same gradients, as
one process would. No DistributedDataParallel: its per-backward hooks cannot run inside a graph.

One optimizer step consumes a *global window* of `accum * world_size` micro-batches, taken from
the single-process order (qlora.data.batch_order) exactly as one process with accumulation
`accum * world_size` would take them. Rank r takes micro-batches r, r + W, r + 2W, ... of the
window. The arithmetic that makes the step equal to the single-process one (docs/DISTRIBUTED.md):

    wanted gradient   g = sum over all micro-batches m of  d(loss_sum_m) / N       N = label tokens
                                                                                   of the window
    each rank backs up   loss_sum_m / N   for its micro-batches (the one-process scale)
    the all-reduce sums: sum_r sum_{m in r} d(loss_sum_m) / N  =  g

N is all-reduced once per step before any forward pass (together with the input-token count and
the stop flag, one small all-reduce).

`--sharding fsdp` (FSDP2 fully_shard) keeps the same split, shards the 4-bit base, adapters and
optimizer states over the ranks, runs the ranks in lockstep (FSDP averages its reduce-scattered
gradients, so each rank backs up W * loss_sum_m / N), and gathers whole tensors only to write or
read checkpoints (the second half of this file; docs/DISTRIBUTED.md).

A rank that fails tells the others through the job's store (`FailureWatch`), so that they all end
at once with its message instead of waiting in a collective until the process group times out.
"""

from __future__ import annotations

import datetime
import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlora.errors import QloraError
from qlora.models.decoder import IGNORE_INDEX


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


def env_from_environ(environ=None) -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; one process when they are absent."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ or int(environ["WORLD_SIZE"]) <= 1:
        return SINGLE
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise QloraError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers; "
                         "launch with `torchrun --nproc-per-node N -m qlora.cli train ...`") from None
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def init(env: DistEnv, device_type: str) -> torch.device | None:
    """Join the process group (nccl on CUDA, gloo on a CPU); the device this rank computes on."""
    if not env.enabled:
        return None
    if device_type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise QloraError(f"LOCAL_RANK {env.local_rank} but torch sees "
                             f"{torch.cuda.device_count()} GPU(s); --nproc-per-node must not "
                             f"exceed the GPUs of this host")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=30), **kwargs)
    return device


def shutdown(env: DistEnv, failed: bool = False) -> None:
    """Leave the process group. After a failure, abort it instead: a peer may still wait in a
    collective, and NCCL's orderly destroy could wait for it."""
    if not (env.enabled and dist.is_initialized()):
        return
    if failed and hasattr(dist.distributed_c10d, "_abort_process_group"):
        dist.distributed_c10d._abort_process_group()
    else:
        # a sharded model's parameters hold the device mesh and with it the group (in reference
        # cycles, hence the collection); left to the interpreter's exit, gloo's threads can
        # outlive it and abort the process ("terminate called without an active exception":
        # tests/test_distributed.py's FSDP worker, 2 of 23 runs on 2 CPUs; 0 of 36 with its
        # model released and collected before the group is destroyed, as here)
        gc.collect()
        dist.destroy_process_group()


PEER_FAILED_EXIT = 1  # the exit code of a rank ended because another one failed


class FailureWatch:
    """Ends every rank of a torchrun job at once when one of them fails, with that rank's message.

    Without it, a rank that raises (an out-of-memory error, a bad batch) leaves the others blocked
    in their next collective until the process group times out (30 minutes), and on other hosts
    nothing tells torchrun that anything went wrong. The job's rendezvous store (MASTER_ADDR:
    MASTER_PORT, held by torchrun) is reachable from every rank: the failing rank writes its
    message there (`announce`), and a thread on every rank looks for it every `interval` seconds
    and, on finding it (or on losing the store, which means the host holding it ended), prints it
    and ends its process. A separate store connection, so the thread never shares one with the
    process group's own traffic. Used as a context manager around the whole run; leaving it
    normally stops the thread (the caller then passes a barrier before any rank exits, so that
    no rank's thread sees the store go away with the end of a good run)."""

    def __init__(self, env: DistEnv, interval: float = 0.5, exit=os._exit):
        import threading

        self.env, self.interval, self._exit = env, interval, exit
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted job starts clean
        self.key = f"qlora/failed/{attempt}"
        self.store = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qlora-failure-watch",
                                        daemon=True)

    def __enter__(self):
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if self.env.enabled and addr and port:
            self.store = dist.TCPStore(addr, int(port), is_master=False,
                                       timeout=datetime.timedelta(seconds=60))
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def announce(self, err: BaseException) -> str | None:
        """Record this rank's failure unless another rank's came first; the first one's message
        (None without a store)."""
        self._stop.set()  # this rank ends by its own error, not by finding it in the store
        if self.store is None:
            return None
        mine = f"rank {self.env.rank} failed: {type(err).__name__}: {err}".strip()
        try:  # only the first failure is kept: the others are usually its consequences
            return self.store.compare_set(self.key, "", mine).decode(errors="replace")
        except Exception:  # noqa: BLE001 -- the store is gone: nobody is left to tell
            return mine

    def end_for(self, message: str) -> None:
        """End this process because of another rank's failure."""
        import sys

        print(f"error: rank {self.env.rank} stops: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self._exit(PEER_FAILED_EXIT)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                found = self.store.check([self.key])
                message = self.store.get(self.key).decode(errors="replace") if found else None
            except Exception as err:  # noqa: BLE001 -- the store's host ended
                if self._stop.is_set():
                    return
                message = (f"lost the job's rendezvous store ({type(err).__name__}: "
                           f"{str(err)[:200]}): the host that held it ended")
            if message is not None and not self._stop.is_set():
                self.end_for(message)
                return


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (fp64, so token counts stay exact)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def metric_sums_on_host(env: DistEnv, sums: dict[str, torch.Tensor], device: torch.device
                        ) -> dict[str, torch.Tensor]:
    """{name: tensor([sum, count])} (methods/preference.metric_sums) on the host, summed over the
    ranks under torchrun: stacked, so that all of them are one copy from the device (one wait for
    the GPU) and one all-reduce, not a read per number. fp32 as on the device (summed over the
    ranks in fp64, as all_reduce_sum does), so that the means are the device's to the bit."""
    if not sums:
        return {}
    names = sorted(sums)
    stacked = torch.stack([sums[n] for n in names])
    if env.enabled:
        stacked = stacked.to(device, torch.float64)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(names, stacked.cpu().float().unbind()))


def rank_share(window: list[int], env: DistEnv) -> list[int]:
    """This rank's micro-batches of a global window: every W-th, starting at its rank."""
    return window[env.rank::env.world_size]


def replicated(env: DistEnv, sharded: bool) -> bool:
    """Whether this run is data parallel with every rank holding the whole model (not FSDP)."""
    return env.enabled and not sharded


def broadcast_trainables(params: list[torch.Tensor], env: DistEnv) -> None:
    """Rank 0's trainable values on every rank. They are equal already (every rank seeds the same
    adapter init, or loaded the same checkpoint); this makes it so whatever the init drew on each
    device, as DDP's broadcast at construction did. Adapters only: megabytes, once per run."""
    if not env.enabled:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_reduce_grads(grads: list[torch.Tensor], env: DistEnv) -> None:
    """Sum the trainable gradients over the ranks, in place: once per optimizer step, after all of
    this rank's micro-batches. `grads` are the flat buffers of optim.flatten_group (one or two
    tensors), so this is one collective per buffer, issued together and waited for together.

    A sum, not a mean: every rank scaled its micro-batches' losses by 1 / N, N the label tokens of
    the whole global window (step.share_window), as one process scales its own."""
    if not env.enabled:
        return
    works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
    for w in works:
        w.wait()


def check_sharding(sharding: str, env: DistEnv, use_dora: bool = False) -> bool:
    """Whether this run shards the model (FSDP2). `--sharding fsdp` in one process has nothing to
    shard and runs the single-process path."""
    if sharding != "fsdp" or not env.enabled:
        return False
    if use_dora:
        raise QloraError("option `use_dora` with `--sharding fsdp`: DoRA reads the whole dequantized "
                         "base weight, which sharding splits over the ranks; use --sharding ddp "
                         "for DoRA, or LoRA (--use_dora false) with fsdp")
    return True


def check_shardable(model_dir: str) -> None:
    """Refuse, before the model loads, a model whose base `--sharding fsdp` cannot shard."""
    from qlora.models.spec import is_native, read_config

    config = read_config(model_dir)[0]
    if not is_native(config):
        raise QloraError("`--sharding fsdp` shards the blocks of the native families (llama, "
                         "mistral, qwen2, qwen3); a model on the generic path trains with "
                         "--sharding ddp (each GPU holds the whole 4-bit base)")
    if config.get("model_type") in ("mixtral", "qwen3_moe"):
        raise QloraError("`--sharding fsdp` does not shard a mixture of experts' 4-bit expert "
                         "stacks yet (they are buffers, which FSDP replicates); train it with "
                         "--sharding ddp, or on one GPU")


# --- sharded (FSDP2): the 4-bit base, adapters, gradients and optimizer states split over ranks ---
SHARDED_OPTIM = "adamw_torch"


def sharded_optim(name: str) -> tuple[str, str | None]:
    """The optimizer of a sharded run and a note when it is not the one asked for.

    bitsandbytes' 8-bit and paged optimizers run their CUDA kernels on plain tensors, not on the
    DTensor shards FSDP2 makes; torch's AdamW steps DTensors, and its fp32 states are sharded like
    the parameters (8 bytes per adapter parameter, divided by the rank count)."""
    if name == SHARDED_OPTIM:
        return name, None
    return SHARDED_OPTIM, (f"optimizer {name} (bitsandbytes) cannot step FSDP-sharded parameters; "
                           f"--sharding fsdp uses {SHARDED_OPTIM}, its states sharded over the ranks")


def float_storage_4bit(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Re-store every bitsandbytes Linear4bit's packed bytes as `dtype` (bitsandbytes'
    `quant_storage`, the Answer.AI FSDP+QLoRA trick), so that FSDP2 shards them along dim 0 beside
    the adapters and norms, and mixed precision leaves them alone (param_dtype == their dtype: no
    cast, the bytes travel unchanged). The bytes are the same (a view); the quant state (absmax,
    code; 1/64 of the bytes with double quant) stays on the module, replicated on every rank, and
    bitsandbytes finds it there again (module.quant_state) when FSDP hands back a plain tensor.
    Returns how many layers were changed."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit) or m.weight.dtype == dtype:
            continue
        w, qs = m.weight, m.weight.quant_state
        raw = w.data.reshape(-1).view(torch.uint8)
        if raw.numel() % dtype.itemsize:
            raise QloraError(f"a 4-bit weight of {raw.numel()} bytes cannot be stored as {dtype}")
        m.weight = bnb.nn.Params4bit(raw.view(dtype).reshape(-1, 1), requires_grad=False,
                                     quant_state=qs, blocksize=w.blocksize,
                                     compress_statistics=w.compress_statistics,
                                     quant_type=w.quant_type, quant_storage=dtype, module=m,
                                     bnb_quantized=True)
        m.quant_state, m.quant_storage = qs, dtype
        n += 1
    return n


def shard_fsdp(model: torch.nn.Module, dtype: torch.dtype,
               device: torch.device | None = None) -> torch.nn.Module:
    """FSDP2: each decoder block one all-gather unit, the rest (embeddings, norm, head) the root's.

    Base bytes, norms, embeddings and adapters are sharded along dim 0 over the ranks; gradients
    come back reduce-scattered (averaged over the ranks) in fp32, and an optimizer built afterwards
    holds only its shard of the states. The model may sit on the CPU: fully_shard moves one
    block at a time to `device` and keeps only this rank's shard there, so no GPU ever holds the
    whole base. Forward runs in `dtype` (the adapters' fp32 values cast as the unsharded model's
    forward casts them)."""
    import bitsandbytes as bnb
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = device or torch.device("cpu")
    float_storage_4bit(model, dtype)
    for m in model.modules():  # the replicated quant state goes where its layer goes
        if isinstance(m, bnb.nn.Linear4bit) and m.quant_state is not None:
            m.quant_state.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def row_part(env: DistEnv, device: torch.device):
    """What this rank reads of the checkpoint in a sharded run (models.load.RowPart): the rows of
    each tensor fully_shard will keep here. The parts' absmax are gathered through `device` (nccl
    gathers GPU tensors only)."""
    from qlora.models.load import RowPart

    def gather(t: torch.Tensor) -> torch.Tensor:
        mine = t.to(device)
        parts = [torch.empty_like(mine) for _ in range(env.world_size)]
        dist.all_gather(parts, mine)
        return torch.cat(parts).to(t.device)

    return RowPart(env.rank, env.world_size, gather)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def micro_batches(window: list[int], env: DistEnv, lockstep: bool) -> list[tuple[int, int]]:
    """(micro-batch index, weight) this rank runs for a global window.

    Its share (rank_share) with weight 1. A rank left short (the last window of an epoch) pads
    with the window's first micro-batch at weight 0: data parallel to one micro-batch, so that
    every rank has a step loss and (preference methods) metric sums to all-reduce; under FSDP
    (`lockstep`) to as many as the fullest rank, because every FSDP forward and backward is a
    collective that all ranks must enter the same number of times."""
    if not env.enabled:
        return [(k, 1) for k in window]
    mine = [(k, 1) for k in rank_share(window, env)]
    need = -(-len(window) // env.world_size) if lockstep else 1
    return mine + [(window[0], 0)] * max(0, need - len(mine))


def _swappable(model: torch.nn.Module):
    """(module, name, parameter) of every trainable DTensor parameter, the same order on every rank."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.requires_grad and isinstance(p, DTensor):
                yield module, name, p


@contextmanager
def full_trainables(model: torch.nn.Module, load: bool = False):
    """Inside the block every trainable parameter is a whole (unsharded) tensor on every rank, so
    the code that saves or loads adapters and checkpoints works as in one process. A collective:
    all ranks enter. `load`: what the block wrote into them is sharded back, from rank 0's copy.
    Nothing happens for a model that is not sharded."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.tensor import distribute_tensor

    swapped = []
    for module, name, p in list(_swappable(model)):
        module._parameters[name] = torch.nn.Parameter(p.full_tensor().detach().clone())
        swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            full = module._parameters[name]
            module._parameters[name] = p
            if load:
                with torch.no_grad():
                    p.copy_(distribute_tensor(full.detach().to(p.device, p.dtype), p.device_mesh,
                                              p.placements))


class _FullOptimizer:
    """What save_checkpoint asks of an optimizer: a state_dict(), here with whole tensors."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def full_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module):
    """The optimizer, or for a sharded model one whose state_dict() is the one a single process
    writes: whole tensors, each parameter group's states concatenated into one flat tensor as
    for its flattened group (optim.flatten_group), so a checkpoint resumes on any rank count.
    A collective (all-gathers in the same order on every rank)."""
    if not is_sharded(model):
        return optimizer
    sd = optimizer.state_dict()
    state, groups = {}, []
    for gi, group in enumerate(sd["param_groups"]):
        per = [sd["state"].get(i, {}) for i in group["params"]]
        if per and all(per):
            state[gi] = {k: (torch.cat([plain(st[k]).detach().cpu().reshape(-1) for st in per])
                             if torch.is_tensor(v) and v.dim() > 0 else v)
                         for k, v in per[0].items()}
        groups.append(dict(group, params=[gi]))
    return _FullOptimizer({"state": state, "param_groups": groups})


class _ShardingLoader:
    """What load_checkpoint asks of an optimizer: load_state_dict(), here of a single process's
    state (flat per group), split per parameter and sharded like each parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def load_state_dict(self, sd: dict) -> None:
        state, groups, idx = {}, [], 0
        for group, saved in zip(self.optimizer.param_groups, sd["param_groups"], strict=True):
            params = group["params"]
            flat = len(saved["params"]) == 1 and len(params) > 1
            ids = list(range(idx, idx + len(params)))
            offset = 0
            for j, p in enumerate(params):
                src = saved["params"][0 if flat else j]
                st = sd["state"].get(src)
                if st:
                    n = p.numel()
                    state[ids[j]] = {k: (v.reshape(-1)[offset:offset + n].view(p.shape).clone()
                                         if flat else v) if torch.is_tensor(v) and v.dim() > 0
                                     else (v.clone() if torch.is_tensor(v) else v)
                                     for k, v in st.items()}
                    offset += n
            groups.append(dict(saved, params=ids))
            idx += len(params)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        shard_optimizer_state(self.optimizer)


def optimizer_for_load(optimizer: torch.optim.Optimizer, model: torch.nn.Module):
    """The optimizer, or for a sharded model a loader that shards a whole-tensor state."""
    return _ShardingLoader(optimizer) if is_sharded(model) else optimizer


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After optimizer.load_state_dict of whole tensors: shard each state like its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def plain(x):
    """A DTensor (clip_grad_norm_'s norm of sharded gradients) as a whole tensor; else x."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


@torch.no_grad()
def lockstep_loss_sums(model, encoded: list[dict], max_len: int, micro_batch: int, pad_id: int,
                       packing: bool, env: DistEnv) -> tuple[float, int]:
    """qlora.eval.loss_sums for a sharded model: rank r takes batches r, r+W, ...; every rank runs
    the same number of forwards (each one is a collective), a rank left short repeating batch 0
    at weight 0. This rank's sums; the caller all-reduces them."""
    from qlora.data import build_rows, make_batch
    from qlora.models.decoder import compute_device

    was_training = model.training
    model.eval()
    device = compute_device(model)
    rows = build_rows(encoded, max_len, packing=packing)
    starts = list(range(0, len(rows), micro_batch))
    rounds = -(-len(starts) // env.world_size)
    total, n_tokens = 0.0, 0
    try:
        for i in range(rounds):
            k = i * env.world_size + env.rank
            start, weight = (starts[k], 1) if k < len(starts) else (starts[0], 0)
            batch = make_batch([[encoded[j] for j in row] for row in rows[start:start + micro_batch]],
                               pad_id)
            loss = float(model(batch["input_ids"].to(device), batch["position_ids"],
                               batch["labels"], real_lengths=batch["real_lengths"]))
            total += loss * weight
            n_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) * weight
    finally:
        model.train(was_training)
    return total, n_tokens
