"""Selectors that pick a calibration set from a pool, on plain arrays: uniform-timestep random, k-means, TAP.

All take the pool's features ``f`` (N, D), timesteps ``t`` (N,) and return sorted row indices, deterministic for a
seed. After selection, ``ensure_coverage`` swaps in one sample for every time bin of the pool that got none (it
takes the place of a sample from the most-selected bin), so every selector covers the whole trajectory when the
budget allows it.
"""

from __future__ import annotations

import numpy as np

N_TIME_BINS = 10


def normalised_time(t: np.ndarray) -> np.ndarray:
    """Timesteps mapped to [0, 1] over the pool's range (on raw timesteps TAP's time kernel would vanish)."""
    t = t.astype(np.float64)
    span = t.max() - t.min()
    return (t - t.min()) / span if span > 0 else np.zeros_like(t)


def time_bins(t: np.ndarray, n_bins: int = N_TIME_BINS) -> np.ndarray:
    """Equal-width bin index of each row's normalised time; distinct pool timesteps are fewer than bins on
    short schedules, so bins may be empty."""
    return np.minimum((normalised_time(t) * n_bins).astype(np.int64), n_bins - 1)


def proportional_quota(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` over groups in proportion to ``sizes`` (largest remainder), never above a group's size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    budget = min(budget, int(sizes.sum()))
    quota = np.zeros_like(sizes)
    while quota.sum() < budget:
        room = sizes - quota
        open_ = room > 0
        left = budget - quota.sum()
        share = np.where(open_, sizes, 0).astype(np.float64)
        exact = left * share / share.sum()
        add = np.minimum(np.floor(exact).astype(np.int64), room)
        if add.sum() == 0:  # hand out the remainder one by one, largest fractional part first (stable order)
            order = np.argsort(-(exact - np.floor(exact)), kind="stable")
            for g in order:
                if left == 0:
                    break
                if room[g] > 0:
                    add[g] += 1
                    left -= 1
        quota += add
    return quota


def select_random(t: np.ndarray, size: int, seed: int) -> np.ndarray:
    """PTQ4DiT-style baseline: the budget spread evenly over the pool's distinct timesteps, random within each."""
    rng = np.random.default_rng(seed)
    steps, inverse = np.unique(t, return_inverse=True)
    counts = np.bincount(inverse)
    # equal share per timestep (ties broken at random), capped by how many rows each timestep has
    quota = _equal_quota(counts, size, rng)
    picked = [rng.choice(np.flatnonzero(inverse == s), quota[s], replace=False) for s in range(len(steps))]
    return np.sort(np.concatenate(picked))


def _equal_quota(counts: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    quota = np.zeros_like(counts)
    budget = min(budget, int(counts.sum()))
    while quota.sum() < budget:
        open_ = np.flatnonzero(quota < counts)
        left = budget - quota.sum()
        if left >= len(open_):
            quota[open_] += np.minimum(left // len(open_), counts[open_] - quota[open_])
        else:
            quota[rng.choice(open_, left, replace=False)] += 1
    return quota


def _pick_by_cluster(emb: np.ndarray, labels: np.ndarray, centers: np.ndarray, size: int) -> np.ndarray:
    """From every cluster, in proportion to its size, the members nearest to its centroid first."""
    k = len(centers)
    counts = np.bincount(labels, minlength=k)
    quota = proportional_quota(counts, size)
    picked = []
    for c in range(k):
        if quota[c] == 0:
            continue
        members = np.flatnonzero(labels == c)
        d = ((emb[members] - centers[c]) ** 2).sum(1)
        picked.append(members[np.argsort(d, kind="stable")[: quota[c]]])
    return np.sort(np.concatenate(picked))


def _kmeans(emb: np.ndarray, k: int, seed: int):
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100).fit(emb)
    return km.labels_, km.cluster_centers_


def select_kmeans(f: np.ndarray, size: int, clusters: int, seed: int) -> np.ndarray:
    """Plain k-means on the features (no time), proportional picking nearest to the centroids."""
    k = max(1, min(clusters, size, len(f)))
    emb = f.astype(np.float32)
    labels, centers = _kmeans(emb, k, seed)
    return _pick_by_cluster(emb, labels, centers, size)


def tap_embedding(f: np.ndarray, t: np.ndarray, alpha: float, sigma: float, landmarks: int, landmark_sets: int,
                  embed_dim: int, seed: int) -> np.ndarray:
    """TAP's parallel landmark spectral embedding (Q&C, DESIGN 4.2), concatenated over ``landmark_sets`` subsets.

    A = alpha * max(cos(f_a, f_l), 0) + (1 - alpha) * exp(-|tau_a - tau_l| / sigma) against n random landmarks,
    L = D_r^-1/2 A D_c^-1/2, and the top ``embed_dim`` left singular vectors of L (from the eigenvectors of the
    randomized SVD), rows normalised. Cosines are clipped at 0 so that the affinity stays non-negative.
    """
    from sklearn.utils.extmath import randomized_svd

    rng = np.random.default_rng(seed)
    n_pool = len(f)
    n = min(n_pool, landmarks if landmarks > 0 else max(embed_dim + 1, n_pool // 20))
    fn = f.astype(np.float32)
    fn = fn / np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
    tau = normalised_time(t).astype(np.float32)
    parts = []
    for _ in range(landmark_sets):
        idx = rng.choice(n_pool, n, replace=False)
        a = np.maximum(fn @ fn[idx].T, 0.0)
        a *= alpha
        a += (1.0 - alpha) * np.exp(-np.abs(tau[:, None] - tau[idx][None, :]) / np.float32(sigma))
        dr = np.maximum(a.sum(1), 1e-12)
        dc = np.maximum(a.sum(0), 1e-12)
        a /= np.sqrt(dr)[:, None]
        a /= np.sqrt(dc)[None, :]
        k = min(embed_dim, n)
        # top-k left singular vectors of the N x n matrix L, by randomized SVD (N n k work, not N n^2)
        u, _, _ = randomized_svd(a, k, n_oversamples=10, n_iter=3, random_state=int(rng.integers(2**31)))
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        parts.append(u.astype(np.float32))
    return np.concatenate(parts, 1)


def select_tap(f: np.ndarray, t: np.ndarray, size: int, *, alpha: float = 0.5, sigma: float = 0.1,
               landmarks: int = 0, landmark_sets: int = 3, embed_dim: int = 16, clusters: int = 100,
               seed: int = 0) -> np.ndarray:
    """TAP: spectral embedding of content + time affinity, k-means, proportional picking nearest to centroids."""
    emb = tap_embedding(f, t, alpha, sigma, landmarks, landmark_sets, embed_dim, seed)
    k = max(1, min(clusters, size, len(f)))
    labels, centers = _kmeans(emb, k, seed)
    return _pick_by_cluster(emb, labels, centers, size)


def ensure_coverage(idx: np.ndarray, t: np.ndarray, seed: int, n_bins: int = N_TIME_BINS) -> np.ndarray:
    """Make every non-empty time bin of the pool hold at least one selected row (budget permitting)."""
    rng = np.random.default_rng(seed)
    bins = time_bins(t, n_bins)
    present = np.unique(bins)
    if len(idx) < len(present):
        return idx
    idx = idx.copy()
    for b in present:
        sel_bins = bins[idx]
        if (sel_bins == b).any():
            continue
        counts = np.bincount(sel_bins, minlength=n_bins)
        donor_bin = int(np.argmax(counts))
        donors = np.flatnonzero(sel_bins == donor_bin)
        candidates = np.setdiff1d(np.flatnonzero(bins == b), idx)
        idx[donors[rng.integers(len(donors))]] = candidates[rng.integers(len(candidates))]
    return np.sort(idx)
