"""What the trainer gets: rows, packed rows or fixed blocks, and batches that keep the LM head to
labelled positions.

    blocks = packed_training_examples(rows, tokenizer, cfg)  # per data.packing

Packing (data.packing, SFT on causal models) changes what the trainer gets, never the validation rows:
`constant` joins every row's whole text with eos and cuts fixed blocks (every token learned, rows see
each other); `rows` packs whole rows into blocks with position ids restarting at each row, so eager, sdpa
and flex attention keep each row to itself (flash attention only at train.batch_size=1: pad_row_blocks).
"""
from __future__ import annotations

import bisect

from loraflow.config import Config
from loraflow.data.tokens import IGNORE_INDEX, sft_token_ids, tokenize_sft


def fixed_blocks(stream: list[int], block_size: int) -> list[dict]:
    """`stream` cut into blocks of block_size with labels = input_ids; the tail shorter than a block is dropped."""
    return [{"input_ids": stream[i:i + block_size], "labels": stream[i:i + block_size]}
            for i in range(0, len(stream) - block_size + 1, block_size)]


def constant_blocks(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """`data.packing: constant`: every row's whole text (the prompt as the model sees it, the target, its end
    token) joined by eos and cut into blocks of data.max_length; every token is learned, the prompt too.

    Rows see each other: a block starts anywhere in a row and attends to the rows before it in the block."""
    eos, stream = tokenizer.eos_token_id, []
    for prompt_ids, _, target_ids in sft_token_ids(rows, tokenizer, cfg):
        stream += prompt_ids + target_ids
        if eos is not None and stream[-1] != eos:  # a target that already ends with eos gets no second one
            stream.append(eos)
    return fixed_blocks(stream, cfg.data.max_length)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity (each length <= capacity): longest
    first, each into the open bin with the least room that still fits it, else into a new bin."""
    rooms: list[int] = []  # the distinct free rooms of open bins, sorted
    open_bins: dict[int, list[list[int]]] = {}
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(rooms, lengths[index])
        if at < len(rooms):
            room = rooms[at]
            members = open_bins[room].pop()
            if not open_bins[room]:
                del open_bins[room], rooms[at]
        else:
            room, members = capacity, []
            bins.append(members)
        members.append(index)
        left = room - lengths[index]
        if left > 0:
            if left not in open_bins:
                bisect.insort(rooms, left)
            open_bins.setdefault(left, []).append(members)
    return bins


def joined_rows(examples: list[dict]) -> dict:
    """One `rows` block: the examples one after another, position_ids restarting at 0 for each.

    Each row's first label is -100: alone nothing predicts it (the loss shifts by one), in a block the
    previous row's last token would. It is a prompt token (already -100); this makes certain of it."""
    block = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        block["input_ids"] += example["input_ids"]
        block["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        block["position_ids"] += list(range(len(example["input_ids"])))
    return block


def pack_rows(examples: list[dict], block_size: int) -> list[dict]:
    """`data.packing: rows`: whole examples (each at most block_size, as tokenize_sft cuts them) packed
    best-fit-decreasing into blocks of at most block_size tokens; see joined_rows and pad_row_blocks."""
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], block_size)
    return [joined_rows([examples[i] for i in members]) for members in bins]


def pad_row_blocks(blocks: list[dict], pad_token_id: int) -> dict:
    """A batch of `rows` blocks as tensors: `collate = functools.partial(pad_row_blocks, pad_token_id=0)`.

    Right-padded to the longest block: pad ids, labels -100, position ids 0 (each pad its own one-token
    sequence). There is no attention_mask: transformers (masking_utils.find_packed_sequence_indices) reads
    the rows from position_ids only when the mask is None and no cache is passed, and then builds a
    block-diagonal causal mask for eager, sdpa and flex attention, so a row attends only to itself. Flash
    attention (2, 3, 4) isolates rows only in a batch of one block (train.batch_size=1): transformers takes
    packed position_ids as row boundaries only for batch size 1; otherwise a row sees the rows before it in
    its block. use_cache=False is set because a cache turns the detection off.
    """
    import torch

    width = max(len(block["input_ids"]) for block in blocks)
    padding = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "position_ids": 0}
    batch = {key: torch.tensor([block[key] + [value] * (width - len(block[key])) for block in blocks])
             for key, value in padding.items()}
    return {**batch, "use_cache": False}


def head_on_labelled_positions(collate, per_token: bool = False):
    """`collate`, each batch also carrying the positions whose next token is a label in some row (logits_to_keep)
    and those next tokens (shift_labels): the vocabulary-wide head, its fp32 upcast and the cross-entropy then skip
    prompt and padding positions, whose labels are ignored anyway. With `per_token` (a model that takes it:
    models.head_on_labelled_tokens) the batch also carries which of those (row, position) pairs have a label
    (labelled_positions) and shift_labels holds only theirs, one row: the head then computes no position of a row
    that another row's label kept. The loss is the same; only work not needed is left out. A batch where every
    position counts is left as it is."""
    import torch

    def collate_kept(examples):
        batch = collate(examples)
        labels = batch["labels"]
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        if len(keep) < shifted.shape[1]:
            batch["logits_to_keep"], batch["shift_labels"] = keep, shifted[:, keep].contiguous()
        if per_token:
            kept = batch.get("shift_labels", shifted)
            labelled = kept != IGNORE_INDEX
            if not bool(labelled.all()):
                batch["logits_to_keep"] = batch.get("logits_to_keep", torch.arange(shifted.shape[1]))
                batch["labelled_positions"], batch["shift_labels"] = labelled, kept[labelled].unsqueeze(0)
        return batch
    return collate_kept


def cpt_blocks(rows: list[dict], tokenizer, block_size: int) -> list[dict]:
    """Raw text joined with eos and cut into fixed-length blocks for continued pretraining (a corpus shorter
    than a block makes one shorter block)."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = []
    for row in rows:
        stream += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + separator
    return fixed_blocks(stream, min(block_size, len(stream)))


def training_examples(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """Tokenised examples for train.objective, never packed: one per SFT row, or CPT blocks.

    Validation loss (generation.validation_loss) is computed on these, so it is per row in every packing mode."""
    if cfg.train.objective == "cpt":
        return cpt_blocks(rows, tokenizer, cfg.data.max_length)
    return tokenize_sft(rows, tokenizer, cfg)


def packed_training_examples(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """What the trainer trains on: training_examples packed per data.packing (constant_blocks, pack_rows)."""
    if cfg.train.objective == "cpt" or cfg.data.packing == "none":
        return training_examples(rows, tokenizer, cfg)
    if cfg.data.packing == "constant":
        return constant_blocks(rows, tokenizer, cfg)
    return pack_rows(tokenize_sft(rows, tokenizer, cfg), cfg.data.max_length)
