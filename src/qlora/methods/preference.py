"""A preference batch through the model: log-probs, the reference, the loss and its metrics.

    policy     one forward over all sequences of the batch (chosen and rejected together), with
               grad; each label token's log-prob from the model (its fused cross-entropy on the
               fast path: only completion positions get logits), summed per sequence (KTO:
               its examples with grad; their KL sequences apart, under no_grad; in an
               evaluation, all under no_grad, both in one forward)
    reference  the same batch with the adapters off (adapters.adapters_disabled), under no_grad,
               in one forward (KTO: one per half, as its policy): the base model is the
               reference, as in TRL with a PEFT model; no second copy
    losses     the method's (methods/<name>.py), one per example; a mixture of experts whose
               load-balancing loss is on (router_aux_loss) adds its coefficient x that loss of
               the policy's forward to each example's, as TRL's trainers add it to their mean,
               and logs it as TRL does (aux_loss)

The batch is padded or packed (data/preference.py); the log-probs are summed by sequence id, so
the two layouts give the same numbers.

`batch_loss` returns the SUM of the per-example losses, as the model's SFT loss is a sum: the loop
divides by the examples of the whole accumulated step, so accumulation averages over examples.
Metrics travel as {name: [sum, count]} so that steps, micro-batches and ranks add up, and are
divided once, when logged (`metric_means`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qlora.adapters import adapters_disabled
from qlora.data.preference import half, label_layout, pair_batch, preference_batch
from qlora.models.attention import Varlen
from qlora.models.decoder import IGNORE_INDEX as IGNORE
from qlora.models.decoder import LabelPositions, compute_device


@dataclass
class PreferenceOptions:
    """The methods' knobs, TRL's names and defaults (RunConfig carries them)."""
    beta: float = 0.1
    loss_type: str = "sigmoid"  # DPO: sigmoid, ipo, hinge
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0  # SimPO: weight of an NLL term on the chosen completions
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0


@dataclass
class RowLogps:
    """Per row: the summed log-prob of its label tokens, their number, and (with grad) the
    summed NLL of those tokens."""
    logps: torch.Tensor  # [R] fp32
    tokens: torch.Tensor  # [R]
    # a mixture of experts': the forward's load-balancing loss and its coefficient (0-d), where on
    router_loss: tuple[torch.Tensor, float] | None = None


class PairLogps:
    """A pair batch's rows split into the chosen half and the rejected half."""

    def __init__(self, rows: RowLogps):
        self.chosen, self.rejected = rows.logps.chunk(2)
        self.chosen_tokens, self.rejected_tokens = rows.tokens.chunk(2)
        self.router_loss = rows.router_loss

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)

    @property
    def chosen_nll_mean(self) -> torch.Tensor:
        """Cross-entropy over all chosen completion tokens of the batch (one token mean)."""
        return -self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)


class UnpairedLogps:
    """A KTO batch: each example's completion, its KL row's (under no_grad), its label."""

    def __init__(self, rows: RowLogps, kl: torch.Tensor, label: torch.Tensor):
        self.completion, self.tokens, self.kl, self.label = rows.logps, rows.tokens, kl, label
        self.router_loss = rows.router_loss


def sequence_logps(token_logps: torch.Tensor, sequences: torch.Tensor, n: int) -> RowLogps:
    """Each of the `n` sequences' summed log-probs (fp32) and label tokens, from the label tokens'
    log-probs and the sequence each is of (counted where the ids are, the loop's on the CPU:
    no wait for the GPU)."""
    device = token_logps.device
    tokens = torch.bincount(sequences, minlength=n).to(device, non_blocking=True)
    sequences = sequences.to(device, non_blocking=True)
    logps = torch.zeros(n, dtype=torch.float32, device=device)
    return RowLogps(logps.index_add(0, sequences, token_logps.float()), tokens)


def row_logps(model, batch: dict) -> RowLogps:
    """RowLogps of the batch's sequences through `model` (one forward), without a router loss:
    its label tokens' positions as data/preference.label_layout gives them, and its attention
    plan where it brings one (a shared prompt's: position_ids cannot say which keys a rejected
    completion sees)."""
    return rows_of(model, batch)(router=False)


# rows(router=...): the RowLogps of a batch's forward, with its router loss (the policy's) or not
Rows = Callable[..., RowLogps]


def rows_of(model, batch: dict) -> Rows:
    """rows(router=True): the batch's RowLogps through the model as it is at each call, with the
    router loss where the model adds one (the policy's forward; router=False for the reference's,
    adapters off, as row_logps); the batch's label layout worked out and copied to the device at
    the first call only: both forwards read the same."""
    ready = None

    def rows(router: bool = True) -> RowLogps:
        nonlocal ready
        if ready is None:
            ready = _on_device(model, batch)
        ids, labels, plan, sequences, weights = ready
        losses = model(ids, batch["position_ids"], labels, varlen=plan, per_token=True)
        logps = sequence_logps(-losses, sequences, batch["n_sequences"])
        return with_router_loss(logps, model, weights) if router else logps

    return rows


def with_router_loss(rows: RowLogps, model, weights: torch.Tensor | None) -> RowLogps:
    """`rows` of the forward just run, with a mixture of experts' load-balancing loss of that
    forward, each token weighing `weights` (data/preference's router_weights, on the device;
    given only where the model adds the loss, MoeLM.adds_router_loss: _on_device, label_slots):
    read now, before another forward (the reference's) records its own router logits."""
    if weights is None:
        return rows
    rows.router_loss = (model.router_aux_loss(weights=weights), model.router_loss_coef)
    return rows


def _on_device(model, batch: dict) -> tuple:
    """(ids, LabelPositions, attention plan or None, each label's sequence, router weights or
    None) of the batch, all but the sequences on the model's compute device."""
    device = compute_device(model)  # not the first parameter's: the embedding may be on the host
    rows, ts, targets, sequences = label_layout(batch)
    width = batch["input_ids"].shape[1]
    labels = LabelPositions((rows * width + ts).to(device, non_blocking=True),
                            targets.to(device, non_blocking=True))
    plan = batch.get("attention")
    weights = batch.get("router_weights") if getattr(model, "adds_router_loss", False) else None
    # non-blocking: a blocking copy would wait for every kernel queued (the previous backward)
    return (batch["input_ids"].to(device, non_blocking=True), labels,
            None if plan is None else plan.to(device), sequences,
            None if weights is None else weights.to(device, non_blocking=True))


def policy_and_reference(method, model, batch: dict):
    """(policy, reference or None) log-probs of a batch for `method`; the reference is `model`
    with its adapters off."""
    if method.LAYOUT == "pairs":
        return pair_logps(method, model, rows_of(model, batch), batch.get("ref_logps"))
    whole = rows_of(model, batch)
    return unpaired_logps(model, rows_of(model, half(batch, second=False)),
                          rows_of(model, half(batch, second=True)), batch["label"],
                          both=lambda router=True: row_halves(whole(router)))


def row_halves(rows: RowLogps) -> tuple[RowLogps, RowLogps]:
    """A KTO batch's RowLogps cut into its examples' and their KL sequences' (the batch holds the
    examples first, data/preference.unpaired_batch)."""
    (logps, kl_logps), (tokens, kl_tokens) = rows.logps.chunk(2), rows.tokens.chunk(2)
    # the router loss (router_weights: the KL sequences' tokens weigh 0) is the examples'
    return RowLogps(logps, tokens, rows.router_loss), RowLogps(kl_logps, kl_tokens)


def unpaired_logps(model, rows: Rows, kl_rows: Rows,
                   label: torch.Tensor,
                   both: Callable[..., tuple[RowLogps, RowLogps]] | None = None
                   ) -> tuple[UnpairedLogps, UnpairedLogps]:
    """(policy, reference) of a KTO batch: `rows()` / `kl_rows()` are the RowLogps of its
    examples' / their KL sequences through `model` as it is now (`router=False`: without the
    router loss, which only the policy's forward of the examples gives). The examples with
    grad; the KL sequences only feed the detached estimate z, so under no_grad (as TRL); the
    reference of each half with the adapters off. Each half is a forward of its own, eagerly as
    in a CUDA graph, whose rows have fixed shapes (train/graphs.py): the reference takes one per
    half too.

    `both()`: (rows(), kl_rows()) from ONE forward over the whole batch (the eager path's): under
    no_grad (an evaluation) nothing needs the examples' grad, so the policy takes one forward and
    the reference one, where TRL runs four."""
    if both is not None and not torch.is_grad_enabled():
        policy_rows, kl_half = both()
        label = label.to(policy_rows.logps.device, non_blocking=True)
        with adapters_disabled(model):
            ref_rows, ref_kl = both(router=False)
        return (UnpairedLogps(policy_rows, kl_half.logps, label),
                UnpairedLogps(ref_rows, ref_kl.logps, label))
    policy_rows = rows()
    label = label.to(policy_rows.logps.device, non_blocking=True)
    with torch.no_grad():
        kl = kl_rows(router=False).logps
        with adapters_disabled(model):
            ref_rows, ref_kl = rows(router=False), kl_rows(router=False).logps
    return UnpairedLogps(policy_rows, kl, label), UnpairedLogps(ref_rows, ref_kl, label)


def pair_logps(method, model, rows: Rows, ref_logps: torch.Tensor | None
               ) -> tuple[PairLogps, PairLogps | None]:
    """(policy, reference or None) of a pairs batch: `rows()` is the batch's RowLogps through
    `model` as it is now (once with grad and the router loss; again with the adapters off, under
    no_grad and `router=False`, for the reference), `ref_logps` the precomputed reference where
    there is one (no forward then)."""
    policy_rows = rows()
    policy, reference = PairLogps(policy_rows), None
    if method.USES_REFERENCE and ref_logps is not None:
        ref = ref_logps.to(policy_rows.logps.device, non_blocking=True)
        reference = PairLogps(RowLogps(ref, policy_rows.tokens))
    elif method.USES_REFERENCE:
        with torch.no_grad(), adapters_disabled(model):
            reference = PairLogps(rows(router=False))
    return policy, reference


@torch.no_grad()
def precompute_reference(model, examples: list[dict], batch_size: int, pad_id: int,
                         packed: bool = False) -> None:
    """Each pair's reference log-probs (the base: adapters off), in batches of `batch_size`
    pairs, written into the examples as "ref_chosen" / "ref_rejected" (floats), which pair_batch
    hands on, so that no training step runs the reference forward (precompute_ref_log_probs)."""
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            for start in range(0, len(examples), batch_size):
                part = examples[start:start + batch_size]
                ref = PairLogps(row_logps(model, pair_batch(part, pad_id, packed)))
                for e, c, r in zip(part, ref.chosen.tolist(), ref.rejected.tolist()):
                    e["ref_chosen"], e["ref_rejected"] = c, r
    finally:
        model.train(was_training)


def packs_with_varlen(model, device: torch.device) -> bool:
    """Whether `model` on `device` runs a packed row's attention through flash varlen attention
    (no mask). Only then is a micro-batch packed into one row the faster layout: elsewhere its
    attention is a dense mask over the whole row, quadratic in the micro-batch's tokens, which
    costs more than the padding it saves (the CPU; Gemma 2's capped scores; the generic path)."""
    if not getattr(model, "packs_documents", False) or not hasattr(model, "layer_masks"):
        return False
    two_documents = torch.tensor([[0, 1, 0, 1]])
    return all(isinstance(m, Varlen) for m in model.layer_masks(two_documents, 0, device))


def layout_line(packed: bool, packing_option: bool) -> str:
    """What the log says of the preference batches' layout."""
    if packed:
        return ("preference batches packed: each micro-batch's sequences end to end in one row, "
                "no padding, through flash varlen attention (pairs: each prompt once, both "
                "completions after it; KTO: its completions and KL sequences); the log-probs are "
                "summed per sequence, as padded rows give them (packing: false pads them)")
    why = "packing: false" if not packing_option else (
        "this model on this device has no flash varlen attention for packed rows, and a dense "
        "mask over one packed row would cost more than the padding")
    return f"preference batches padded, one sequence per row ({why})"


def batch_loss(method, model, batch: dict, opts: PreferenceOptions
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of the batch's per-example losses, {metric: tensor([sum, count])})."""
    return summed_losses(method, *policy_and_reference(method, model, batch), opts)


def summed_losses(method, policy, reference, opts: PreferenceOptions
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The method's losses of the log-probs, summed, and its metric sums: the one tail of
    batch_loss (eager) and staged_batch_loss (a CUDA graph's body)."""
    losses, metrics = method.losses(policy, reference, opts)
    total = losses.sum()
    if policy.router_loss is not None:  # TRL: mean loss + coef x aux, so each example's + it
        aux, coef = policy.router_loss
        total = total + coef * aux * losses.numel()
        metrics["aux_loss"] = aux
    return total, metric_sums(metrics)


# --- a preference batch through a CUDA graph (train/graphs.py) ----------------------------------
def label_slots(batch: dict, length: int, multiple: int, router: bool = False
                ) -> dict[str, torch.Tensor]:
    """A batch's label tokens (a pairs batch's, or one half of a KTO batch's: data/preference.half)
    laid out on the host for a graph whose rows are padded to
    `length` tokens: what label_layout and sequence_logps read from the batch, in tensors
    whose shapes the graph fixes. The label count is rounded up to a multiple of `multiple`;
    the extra slots predict from position 0 a target of IGNORE_INDEX (a loss of 0) into sequence
    slot S, one past the batch's S sequences, which nothing reads.

        positions  [L] the flat position (row · length + t) that predicts each label
        targets    [L] the label (IGNORE_INDEX on the extra slots)
        sequences  [L] the sequence of each label (S on the extra slots)
        tokens     [S] label tokens per sequence
        ref_logps  [S] the precomputed reference, where the batch has it
        router_weights  [rows, length] each token's weight in a mixture of experts' router loss
                   (data/preference's), the graph's padding 0; only with `router` (the model
                   adds that loss)
    """
    rows, ts, targets, sequences = label_layout(batch)
    n, count = batch["n_sequences"], rows.numel()
    slots = max(-(-count // multiple) * multiple, multiple)
    out = {"positions": torch.zeros(slots, dtype=torch.long),
           "targets": torch.full((slots,), IGNORE, dtype=torch.long),
           "sequences": torch.full((slots,), n, dtype=torch.long),
           "tokens": torch.bincount(sequences, minlength=n)}
    out["positions"][:count] = rows * length + ts
    out["targets"][:count] = targets
    out["sequences"][:count] = sequences
    if "ref_logps" in batch:
        out["ref_logps"] = batch["ref_logps"].float()
    if router:  # the graph's padding weighs 0
        weights = batch["router_weights"]
        out["router_weights"] = torch.zeros(weights.shape[0], length)
        out["router_weights"][:, :weights.shape[1]] = weights
    return out


def slot_logps(token_losses: Callable[[LabelPositions], torch.Tensor],
               slots: dict[str, torch.Tensor]) -> RowLogps:
    """RowLogps of the staged sequences: `token_losses(labels)` is the model's per-token loss
    over the staged rows (DecoderLM.forward with per_token), summed into fixed sequence slots."""
    losses = token_losses(LabelPositions(slots["positions"], slots["targets"]))
    n = slots["tokens"].numel()
    logps = torch.zeros(n + 1, dtype=torch.float32, device=losses.device)  # slot n: padding
    logps = logps.index_add(0, slots["sequences"], -losses.float())
    return RowLogps(logps[:n], slots["tokens"])


TokenLosses = Callable[[LabelPositions], torch.Tensor]


def staged_batch_loss(method, model, token_losses: TokenLosses, slots: dict[str, torch.Tensor],
                      opts: PreferenceOptions,
                      kl: tuple[TokenLosses, dict[str, torch.Tensor]] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """batch_loss of a batch staged by label_slots, its tensors on the device: no host sync and
    no shape read from the data, so a CUDA graph records it (train/graphs.py). KTO's examples
    are `token_losses` / `slots` (with its `label` slot), their KL sequences, staged as rows of
    their own, `kl`."""
    def rows(router: bool = True) -> RowLogps:
        logps = slot_logps(token_losses, slots)
        return with_router_loss(logps, model, slots.get("router_weights")) if router else logps

    if method.LAYOUT == "pairs":
        policy, reference = pair_logps(method, model, rows, slots.get("ref_logps"))
    else:
        kl_losses, kl_slots = kl
        policy, reference = unpaired_logps(
            model, rows, lambda router=False: slot_logps(kl_losses, kl_slots), slots["label"])
    return summed_losses(method, policy, reference, opts)


def metric_sums(metrics: dict) -> dict[str, torch.Tensor]:
    """{name: tensor([sum, count])} of a method's metrics: each a tensor whose entries all count,
    or (values, mask) where only some do (KTO's desirable or undesirable examples): a masked sum
    and the mask's count, on the device. Indexing by the mask would take its shape from the
    labels: a host sync, which no CUDA graph records."""
    out = {}
    for name, v in metrics.items():
        if isinstance(v, tuple):
            values, mask = v
            out[name] = torch.stack([torch.where(mask, values.detach().float(), 0).sum(),
                                     mask.sum(dtype=torch.float32)])
        else:  # the count by a fill on the device, not a copy from the host: a graph holds it
            out[name] = torch.stack([v.detach().float().sum(),
                                     v.new_full((), float(v.numel()), dtype=torch.float32)])
    return out


def add_metrics(total: dict[str, torch.Tensor], more: dict[str, torch.Tensor]) -> None:
    for name, v in more.items():
        total[name] = total[name] + v if name in total else v.clone()


def metric_means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: mean}; a metric none of whose examples came (KTO without an undesirable one) is
    left out. KTO has no pairs: its margin is the difference of the two means, as TRL logs it."""
    out = {name: float(v[0] / v[1]) for name, v in sorted(sums.items()) if float(v[1]) > 0}
    if "rewards/margins" not in out and {"rewards/chosen", "rewards/rejected"} <= out.keys():
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


@torch.no_grad()
def evaluate(method, model, examples: list[dict], opts: PreferenceOptions, batch_size: int,
             pad_id: int, shard: tuple[int, int] = (0, 1), packed: bool = False
             ) -> tuple[float, int, dict]:
    """(summed loss, examples, metric sums) of `examples`, in batches of `batch_size` examples,
    padded or packed; `shard=(rank, ranks)`: this process takes every ranks-th batch (the caller
    sums over ranks). Every rank runs as many batches, a rank left short the first one again at
    weight 0, as distributed.lockstep_loss_sums: every rank then has every metric's sums, whose
    names the caller's all-reduce stacks, and a sharded model (each forward a collective) the
    same number of forwards on every rank."""
    rank, ranks = shard
    starts = list(range(0, len(examples), batch_size))
    if not starts:
        return 0.0, 0, {}
    was_training = model.training
    model.eval()
    total, count, sums = 0.0, 0, {}
    try:
        for k in range(rank, -(-len(starts) // ranks) * ranks, ranks):
            start, weight = (starts[k], 1) if k < len(starts) else (0, 0)
            batch = preference_batch(examples[start:start + batch_size], pad_id, packed)
            loss, metrics = batch_loss(method, model, batch, opts)
            # summed on the device, read once below (a read per batch is a wait for the GPU per
            # batch); in float64, as the host's float sum was: the same bits
            total = total + loss.double() * weight
            count += batch["n_examples"] * weight
            add_metrics(sums, {name: v * weight for name, v in metrics.items()})
    finally:
        model.train(was_training)
    return float(total), count, sums
