"""Union-find over integer ids, with groups listed in a fixed order (reruns give the same)."""

from __future__ import annotations


class UnionFind:
    def __init__(self, size: int = 0):
        self.parent = list(range(size))

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the lower id stays the root: groups are named by their smallest member
            self.parent[max(ra, rb)] = min(ra, rb)


def groups_of_pairs(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected groups (size >= 2) of the ids in ``pairs``, each sorted, ordered by first id."""
    ids = sorted({i for pair in pairs for i in pair})
    position = {v: n for n, v in enumerate(ids)}
    uf = UnionFind(len(ids))
    for a, b in pairs:
        uf.union(position[a], position[b])
    groups: dict[int, list[int]] = {}
    for v in ids:
        groups.setdefault(uf.find(position[v]), []).append(v)
    return sorted(groups.values(), key=lambda g: g[0])
