"""Union-find whose representative is the smallest member: with documents numbered in corpus order, the root of a
cluster is its first document, the one dedup keeps."""

import numpy as np


def first_of_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """For n nodes joined by the edges (left[i], right[i]), each node's smallest connected node (int64 array)."""
    parent = list(range(n))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for u, v in zip(left.tolist(), right.tolist()):
        ru, rv = find(u), find(v)
        if ru != rv:  # the larger root joins the smaller, so every root is its component's minimum
            parent[max(ru, rv)] = min(ru, rv)
    return np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
