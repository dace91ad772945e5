"""Sequence packing (`train.packing`): a micro-batch's sequences laid end to end in fewer rows.

A micro-batch is [N, T], right-padded to its longest sequence: chosen and rejected of one pair
differ in length, so part of every forward is padding. Packing puts the N sequences, first fit
by decreasing length, into R rows of width W (the multiple of T that leaves the least padding),
each sequence with its own position ids from 0. transformers reads position ids that restart as
separate sequences (a block-diagonal causal mask: `masking_utils.find_packed_sequence_indices`;
it needs no attention mask and no cache), so no token attends across a boundary. The model runs
on [R, W]; its logits are gathered back to the [N, T] layout (`unpack_index`), so the losses read
them exactly as unpacked (tests/unit/train/test_packing.py: equal log-probs within 1e-5; the training-path
test: the same losses and weights as the padded path in fp32). Which pairs a step trains on is
unchanged. Held-out scoring stays padded (no gradients; it is a small share of the time).
"""

import numpy as np


def pack(input_ids_NT: np.ndarray, attention_mask_NT: np.ndarray, pad_id: int) -> dict:
    """`packed_input_ids` / `packed_position_ids` [R, W] and `unpack_index` [N, T]: the flat index in
    [R * W] of each token of the padded layout (padding points at 0; its logits are never read). W is the
    row width, among multiples of T, that leaves the least padding (`row_width`)."""
    n, width = input_ids_NT.shape
    lengths = attention_mask_NT.sum(1).astype(np.int64)
    row = row_width(lengths, width)
    place, free = first_fit(lengths, row)
    rows = len(free)
    packed = np.full((rows, row), pad_id, dtype=np.int64)
    # Padding at a row's end counts from 0 too: a sequence of its own, attended by nothing real.
    positions = np.zeros((rows, row), dtype=np.int64)
    for r in range(rows):
        used = row - free[r]
        positions[r, used:] = np.arange(row - used)
    unpack = np.zeros((n, width), dtype=np.int64)
    for i, ((r, offset), length) in enumerate(zip(place, lengths)):
        packed[r, offset : offset + length] = input_ids_NT[i, :length]
        positions[r, offset : offset + length] = np.arange(length)
        unpack[i, :length] = r * row + offset + np.arange(length)
    return {"packed_input_ids": packed, "packed_position_ids": positions, "unpack_index": unpack}


def first_fit(lengths: np.ndarray, width: int) -> tuple[np.ndarray, list[int]]:
    """First fit by decreasing length into rows of `width`: each sequence's (row, offset), each row's room left."""
    free: list[int] = []
    place = np.zeros((len(lengths), 2), dtype=np.int64)
    for i in np.argsort(-lengths, kind="stable"):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(width)
        place[i] = row, width - free[row]
        free[row] -= lengths[i]
    return place, free


MAX_ROW_MULTIPLE = 8  # rows at most 8 x the longest sequence: attention over a row grows with its width squared


def row_width(lengths: np.ndarray, longest: int) -> int:
    """The width, k x `longest` for k in 1..MAX_ROW_MULTIPLE, whose first-fit rows hold the least padding
    (the narrowest of equals). Rows as wide as the longest sequence leave a gap in most rows when lengths vary."""
    total = int(lengths.sum())
    best, best_area = longest, None
    for k in range(1, MAX_ROW_MULTIPLE + 1):
        width = k * longest
        area = len(first_fit(lengths, width)[1]) * width
        if best_area is None or area < best_area:
            best, best_area = width, area
        if width >= total:
            break  # one row holds everything
    return best


def unpack_logits(packed_logits_RTV, unpack_index_NT):
    """The packed forward's logits [R, T, V] in the padded layout [N, T, V] (a gather: gradients flow)."""
    flat = packed_logits_RTV.reshape(-1, packed_logits_RTV.shape[-1])
    n, width = unpack_index_NT.shape
    return flat.index_select(0, unpack_index_NT.reshape(-1)).view(n, width, -1)
