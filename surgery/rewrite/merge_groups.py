"""Which experts merge into which: one group per expert of the output, its first id the representative.

Three groupings (all per MoE layer, `k` groups, numpy only):
- `hc_smoe_groups` (HC-SMoE, arXiv 2410.08589): hierarchical clustering with average linkage on the
  Euclidean distance between the experts' mean outputs over every calibration token (routed or not, so
  the grouping does not depend on the routing: the statistics file's `dense_out_sum`);
- `mc_smoe_groups` (MC-SMoE, arXiv 2310.01334): the `k` most used experts are dominant, every other
  expert joins the dominant expert whose router logits are most similar (cosine over the calibration
  tokens, from `logit_gram`);
- `similarity_groups` (ours): the representatives are a plan's kept experts; every removed expert joins
  the kept one whose mean routed output is most similar (cosine, from `out_sum`).

The representative (the group's most used expert, or the plan's kept one) gives the merged expert its
router row: a plain checkpoint has one router row per expert, where the papers keep every original row
pointing at the merged expert.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Groups = list[list[int]]  # groups ordered by representative id; group[0] is the representative


def _ordered(groups: Groups, freq: np.ndarray) -> Groups:
    """Each group led by its most used member (ties: lowest id), the rest ascending; groups by representative."""
    out = []
    for g in groups:
        rep = min(g, key=lambda i: (-freq[i], i))
        out.append([rep, *sorted(i for i in g if i != rep)])
    return sorted(out, key=lambda g: g[0])


def average_linkage(points: np.ndarray, k: int) -> Groups:
    """Agglomerative clustering of the rows of `points` into `k` clusters: repeatedly join the two clusters
    with the smallest mean pairwise Euclidean distance (average linkage; ties: the lowest ids)."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot cluster {n} experts into {k} groups")
    diff = points[:, None, :] - points[None, :, :]
    dist = np.sqrt((diff * diff).sum(-1))
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    link = dist.copy()  # average distance between live clusters, indexed by their first id
    np.fill_diagonal(link, np.inf)
    while len(clusters) > k:
        live = sorted(clusters)
        sub = link[np.ix_(live, live)]
        a, b = np.unravel_index(int(np.argmin(sub)), sub.shape)
        a, b = sorted((live[a], live[b]))
        na, nb = len(clusters[a]), len(clusters[b])
        link[a, :] = link[:, a] = (na * link[a, :] + nb * link[b, :]) / (na + nb)
        link[a, a] = np.inf
        link[b, :] = link[:, b] = np.inf
        clusters[a] += clusters.pop(b)
    return list(clusters.values())


def hc_smoe_groups(dense_out_sum: np.ndarray, tokens: float, freq: np.ndarray, k: int) -> Groups:
    """HC-SMoE: average-linkage clusters of the experts' mean outputs over every token."""
    return _ordered(average_linkage(dense_out_sum / max(float(tokens), 1.0), k), freq)


def _cosine(gram: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    return gram / np.maximum(np.outer(d, d), 1e-30)


def mc_smoe_groups(logit_gram: np.ndarray, freq: np.ndarray, k: int) -> Groups:
    """MC-SMoE: the k most used experts dominate; the others join the most router-logit-similar dominant one."""
    order = sorted(range(len(freq)), key=lambda i: (-freq[i], i))
    return _assign(sorted(order[:k]), _cosine(logit_gram), freq)


def similarity_groups(keep: list[int], out_sum: np.ndarray, freq: np.ndarray) -> Groups:
    """Ours: the plan's kept experts lead; each removed expert joins the kept one with the most similar mean
    routed output (cosine; an expert never routed joins the first kept one, with weight 0)."""
    means = out_sum / np.maximum(freq, 1.0)[:, None]
    return _assign(list(keep), _cosine(means @ means.T), freq, ordered=False)


def _assign(reps: list[int], sim: np.ndarray, freq: np.ndarray, ordered: bool = True) -> Groups:
    """Every non-representative joins its most similar representative (ties: the first one)."""
    groups = {r: [r] for r in reps}
    for i in range(sim.shape[0]):
        if i not in groups:
            groups[reps[int(np.argmax(sim[i, reps]))]].append(i)
    if ordered:  # MC-SMoE's dominant experts lead their groups by construction
        return sorted(([r, *sorted(g[1:])] for r, g in groups.items()), key=lambda g: g[0])
    return [[r, *sorted(groups[r][1:])] for r in reps]


NEEDS = {"hc-smoe": ("dense_out_sum", "collect --merge-stats"), "mc-smoe": ("logit_gram", "collect --merge-stats")}


def groups_for(method: str, keep: dict[int, list[int]], field: Callable[[int, str], np.ndarray],
               has: Callable[[str], bool], label: str) -> dict[int, Groups]:
    """Per planned layer, the groups of `method`, as many as the plan keeps there: hc-smoe and mc-smoe choose
    their own representatives (the plan only sets the counts), lsq keeps the plan's experts.
    `field(layer, name)` reads the statistics; `has(name)` says whether the file holds an optional field."""
    from surgery.rewrite.merge import METHODS, MergeError

    if method not in METHODS:
        raise MergeError(f"--merge {method!r}: choose one of {', '.join(METHODS)}")
    if method in NEEDS and not has(NEEDS[method][0]):
        raise MergeError(f"{label}: --merge {method} needs the statistics' {NEEDS[method][0]}; "
                         f"collect them with `{NEEDS[method][1]}`")
    out: dict[int, Groups] = {}
    for layer, kept in keep.items():
        freq = field(layer, "count")
        if method == "hc-smoe":
            out[layer] = hc_smoe_groups(field(layer, "dense_out_sum"), float(field(layer, "tokens")[0]), freq,
                                        len(kept))
        elif method == "mc-smoe":
            out[layer] = mc_smoe_groups(field(layer, "logit_gram"), freq, len(kept))
        else:
            out[layer] = similarity_groups(list(kept), field(layer, "out_sum"), freq)
    return out
