"""Accuracy of an engine on a labelled split, per bit-width."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import numpy as np
from tqdm import tqdm

from model_store.fashion_mnist import Split

RunFn = Callable[[np.ndarray, int], np.ndarray]


def accuracy(
    run: RunFn, split: Split, bits_list: Iterable[int], batch: int = 250, progress: bool = True
) -> dict[int, float]:
    bits_list = list(bits_list)
    correct = dict.fromkeys(bits_list, 0)
    bar = tqdm(total=len(split) * len(bits_list), desc="eval", unit="img", file=sys.stderr, disable=not progress)
    for bits in bits_list:
        for i in range(0, len(split), batch):
            images = split.images[i : i + batch][:, None]
            pred = run(images, bits).argmax(1)
            correct[bits] += int((pred == split.labels[i : i + batch]).sum())
            bar.update(len(images))
    bar.close()
    return {b: correct[b] / len(split) for b in bits_list}
