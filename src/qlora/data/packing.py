"""Rows, micro-batches and the order they come in.

A row is a list of example indices laid end to end (padding-free packing). Inside a row each
example keeps its own positions 0..n-1; the model starts a new document wherever position_ids
restart at 0, so no token attends across a seam, and the first label of every example is -100,
so no loss crosses one (ARCHITECTURE.md, "Data").

The epoch order is a seeded permutation of the rows that depends only on (seed, epoch), so
the loop can resume at micro-batch k of epoch e by storing just (e, k).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator

import torch

from qlora.errors import QloraError
from qlora.models.decoder import IGNORE_INDEX as IGNORE



def _length(e) -> int:
    return e if isinstance(e, int) else len(e["input_ids"])


def pack_examples(examples: list, max_len: int, seed: int = 0) -> list[list[int]]:
    """Rows of example indices, each row at most max_len tokens in total.

    Best-fit decreasing: longest examples first, each into the fullest row it still fits in
    (a sorted list of free space, so it stays fast for 100k examples). `examples` are encoded
    examples or plain lengths. Ties in length are broken by a seeded shuffle so packing does
    not depend on file order. The rows come out in the order they were opened.
    """
    lengths = [_length(e) for e in examples]
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        raise QloraError(f"{len(too_long)} examples are longer than max_len={max_len} "
                         f"(first: index {too_long[0]}, {lengths[too_long[0]]} tokens); "
                         f"truncate or drop them first (data option overlong).")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle breaks ties
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
        else:
            r, space = len(rows), max_len
            rows.append([i])
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def unpacked_rows(n_examples: int) -> list[list[int]]:
    """Packing off: every example is its own row."""
    return [[i] for i in range(n_examples)]


def build_rows(examples: list, max_len: int, packing: bool = True, seed: int = 0) -> list[list[int]]:
    return pack_examples(examples, max_len, seed) if packing else unpacked_rows(len(examples))


def make_batch(rows: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """LongTensors input_ids, labels, position_ids [B, T], T the longest row, and real_lengths
    [B]: each row's tokens before its padding.

    Each row is a list of encoded examples, concatenated. position_ids restart at 0 at every
    example and again at the padding (so padding is a document of its own that nothing attends
    to); padding has labels -100, as does the first token of every example. Nothing in the rest
    tells padding apart from a document (pad_id may be EOS, a prompt has no labels): the model
    takes real_lengths for what must leave it out (a mixture of experts' load-balancing loss)."""
    flat_ids, flat_labels, flat_pos = [], [], []
    for row in rows:
        ids, labels, pos = [], [], []
        for e in row:
            n = len(e["input_ids"])
            ids += e["input_ids"]
            lab = list(e["labels"])
            if lab:
                lab[0] = IGNORE
            labels += lab
            pos += range(n)
        flat_ids.append(ids)
        flat_labels.append(labels)
        flat_pos.append(pos)
    T = max((len(r) for r in flat_ids), default=0)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b in range(B):
        n = len(flat_ids[b])
        input_ids[b, :n] = torch.tensor(flat_ids[b], dtype=torch.long)
        labels[b, :n] = torch.tensor(flat_labels[b], dtype=torch.long)
        position_ids[b, :n] = torch.tensor(flat_pos[b], dtype=torch.long)
        position_ids[b, n:] = torch.arange(T - n)
    real_lengths = torch.tensor([len(r) for r in flat_ids], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "real_lengths": real_lengths}


def batch_order(n_rows: int, epoch: int, seed: int) -> list[int]:
    """The row order of `epoch`: a permutation that depends only on (seed, epoch)."""
    order = list(range(n_rows))
    random.Random(f"qlora-epoch-{seed}-{epoch}").shuffle(order)
    return order


def num_batches(n_rows: int, micro_batch_size: int) -> int:
    """Micro-batches per epoch (the last one may be smaller)."""
    return math.ceil(n_rows / micro_batch_size)


def micro_batch(examples: list[dict], rows: list[list[int]], order: list[int], k: int,
                micro_batch_size: int, pad_id: int, collate=None
                ) -> tuple[dict[str, torch.Tensor], int]:
    """Micro-batch k of an epoch whose row order is `order`, and its number of input tokens.
    `collate(row_examples, pad_id)`: another batch layout (preference pairs), which says its
    own number of tokens ("n_tokens")."""
    chosen = order[k * micro_batch_size:(k + 1) * micro_batch_size]
    row_examples = [[examples[i] for i in rows[r]] for r in chosen]
    if collate is not None:
        batch = collate(row_examples, pad_id)
        return batch, batch["n_tokens"]
    n_tokens = sum(len(e["input_ids"]) for row in row_examples for e in row)
    return make_batch(row_examples, pad_id), n_tokens


def iterate_batches(examples: list[dict], rows: list[list[int]], micro_batch_size: int,
                    epoch: int, seed: int, pad_id: int, start: int = 0
                    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index, batch) for the micro-batches of `epoch`, from micro-batch `start` on.

    To resume, store (epoch, index + 1) of the last micro-batch consumed and pass that index
    as `start`: the batches are the same ones an uninterrupted run would have seen."""
    if micro_batch_size < 1:
        raise QloraError(f"micro_batch_size must be at least 1, not {micro_batch_size}.")
    order = batch_order(len(rows), epoch, seed)
    for k in range(start, num_batches(len(rows), micro_batch_size)):
        yield k, micro_batch(examples, rows, order, k, micro_batch_size, pad_id)[0]
