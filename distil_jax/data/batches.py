"""Rows -> batches: ``BatchIterator`` (deterministic, endless, resumable from a two-int state)
for training and ``eval_batches`` (finite, ordered, static shapes) for evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from distil_jax.data.layout import Arrays

# The key of a process-local batch (BatchIterator(process_rows=...)) that holds each row's real
# tokens (segment id > 0) for EVERY row of the global batch, [global rows] int32: what the
# padding-aware step needs to pick the same logits bucket on every process (train_step).
ROW_TOKENS = "row_tokens"


def row_count(arrays: Arrays) -> int:
    """The number of rows of arrays that share their leading (row) dimension; ValueError if they do not."""
    sizes = {k: int(np.shape(v)[0]) for k, v in arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must share their leading (row) dimension, got {sizes}")
    return sizes.popitem()[1]


def _pad_rows(batch: Arrays, batch_size: int) -> Arrays:
    """Appends all-zero rows (segment 0: fully masked) up to batch_size, for static shapes."""
    n = next(iter(batch.values())).shape[0]
    if n == batch_size:
        return batch
    return {
        k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
    }


class BatchIterator:
    """Endless, deterministic, resumable batches {key: [batch_size, ...]} over the rows of arrays.

    Epoch e visits the rows in the order ``np.random.default_rng([seed, e]).permutation(n)``
    (row order when shuffle=False), batch_size rows per step. With drop_last the incomplete
    tail of each epoch is skipped; without it, the last batch is filled with all-zero
    (segment 0, fully masked) rows so shapes stay static.

    ``state()`` is {"epoch", "index"} (the next batch), plain ints for JSON; ``restore(state)``
    on an iterator built with the same arguments continues exactly where the saved one was.

    process_rows: the rows of each global batch this process builds (``sharding.process_rows``:
    its devices' rows); each batch then holds only those rows, plus ``ROW_TOKENS``: the real
    tokens of every row of the global batch (needs a "segment_ids" array). Every process walks
    the same global order, so the batches of all processes together are the global batch.
    None: the whole batch.
    """

    def __init__(
        self,
        arrays: Arrays,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 42,
        drop_last: bool = True,
        process_rows: slice | None = None,
    ):
        if int(batch_size) != batch_size or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be a positive integer")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_rows = row_count(self.arrays)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if drop_last:
            self.steps_per_epoch = self.num_rows // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_rows // self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_rows} rows make no batch of batch_size={self.batch_size}: lower "
                "batch_size, use more data, or set drop_last=False"
            )
        self.process_rows = process_rows
        if process_rows is not None:
            if "segment_ids" not in self.arrays:
                raise ValueError("process_rows needs a segment_ids array (the rows' real tokens)")
            if not 0 <= process_rows.start < process_rows.stop <= self.batch_size:
                raise ValueError(f"process_rows={process_rows} is not a range of the "
                                 f"{self.batch_size} rows of a batch")
            # Once per run (n ints): a batch's summary is then a gather of batch_size of them.
            self._row_tokens = (self.arrays["segment_ids"] > 0).sum(-1).astype(np.int32)
        self.epoch = 0
        self.index = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def __iter__(self) -> Iterator[Arrays]:
        return self

    def __next__(self) -> Arrays:
        order = self._order(self.epoch)
        rows = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        if self.process_rows is None:
            batch = _pad_rows({k: v[rows] for k, v in self.arrays.items()}, self.batch_size)
        else:
            batch = self._process_batch(rows)
        self.index += 1
        if self.index == self.steps_per_epoch:
            # Canonical state: "start of the next epoch", never "past the end of this one".
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def _process_batch(self, rows: np.ndarray) -> Arrays:
        """This process's rows of the global batch made of `rows` (fewer than batch_size at the
        end of an epoch: the missing rows are all-zero ones), and every row's real tokens."""
        lo, hi = self.process_rows.start, self.process_rows.stop
        mine = rows[lo:hi]
        batch = _pad_rows({k: v[mine] for k, v in self.arrays.items()}, hi - lo)
        tokens = np.zeros(self.batch_size, np.int32)
        tokens[: len(rows)] = self._row_tokens[rows]
        batch[ROW_TOKENS] = tokens
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(
                f"cannot restore batch state {state}: index must be in [0, "
                f"{self.steps_per_epoch}] (steps_per_epoch) for these arrays and batch_size"
            )
        if index == self.steps_per_epoch:
            epoch, index = epoch + 1, 0
        self.epoch, self.index = epoch, index


def eval_batches(arrays: Arrays, batch_size: int) -> Iterator[Arrays]:
    """Every row once, in order, batch_size rows per batch; the last batch is filled with
    all-zero (segment 0) rows, so every held-out token counts exactly once and shapes are static.
    """
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = row_count(arrays)
    for start in range(0, n, batch_size):
        yield _pad_rows({k: v[start : start + batch_size] for k, v in arrays.items()}, batch_size)
