"""Pool-adjacent-violators for CPU tensors, compiled by numba (O(n) per row, one pass).

The batched torch version in :mod:`layers.sort_native` merges every violating pair per round, a
few dozen small tensor operations a call; this loop does the same pooling in one compiled call,
so small problems (``n`` of a few dozen) cost microseconds instead of Python overhead. It is
imported lazily, on the first CPU projection, and only when numba is installed; the torch
version stays the path on other devices and the reference the tests check this one against.
The compiled code is cached next to this file (``cache=True``), so a new process loads it
instead of compiling it again.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def pav_blocks(
    s: np.ndarray,
    w: np.ndarray,
    block: np.ndarray,
    count: np.ndarray,
    ms: np.ndarray,
    mw: np.ndarray,
) -> None:  # pragma: no cover - compiled; checked against the torch version by the tests
    """Blocks of the decreasing isotonic regression of ``s - w`` (float64 rows of ``(B, n)``).

    Writes ``block (B, n)`` (int64, the block index of each position), ``count (B, n)`` (the
    size of block ``b`` at entry ``b``, 1 where unused) and the block means ``ms``, ``mw`` of
    ``s`` and ``w`` (0 where unused). Two neighbouring blocks merge when the mean of ``s - w``
    rises from one to the next, compared as means of ``s`` and ``w`` separately (as the torch
    version does, which keeps ties in huge ``s`` exact).
    """
    B, n = s.shape
    means = np.empty((2, n))
    work = np.empty((2, n))
    iwork = np.empty((2, n), np.int64)
    for b in range(B):
        _pav_row(s[b], w[b], block[b], count[b], means, work, iwork)
        blocks = block[b, n - 1] + 1
        for k in range(n):
            ms[b, k] = means[0, k] if k < blocks else 0.0
            mw[b, k] = means[1, k] if k < blocks else 0.0


@numba.njit(cache=True, nogil=True)
def _pav_row(
    s: np.ndarray,
    w: np.ndarray,
    block: np.ndarray,
    count: np.ndarray,
    means: np.ndarray,
    work: np.ndarray,
    iwork: np.ndarray,
) -> None:
    """One row of :func:`pav_blocks`: fills ``block``, ``count`` and the block means of ``s``
    and ``w`` in ``means (2, n)`` (``work (2, n)``, ``iwork (2, n)`` scratch)."""
    n = s.shape[0]
    ss, sw = work[0], work[1]
    cnt, first = iwork[0], iwork[1]
    top = -1
    for i in range(n):
        top += 1
        ss[top] = s[i]
        sw[top] = w[i]
        cnt[top] = 1
        first[top] = i
        while top > 0:
            c0 = cnt[top - 1]
            c1 = cnt[top]
            if ss[top - 1] / c0 - ss[top] / c1 < sw[top - 1] / c0 - sw[top] / c1:
                ss[top - 1] += ss[top]
                sw[top - 1] += sw[top]
                cnt[top - 1] += c1
                top -= 1
            else:
                break
    for k in range(top + 1):
        c = cnt[k]
        means[0, k] = ss[k] / c
        means[1, k] = sw[k] / c
        count[k] = c
        for i in range(first[k], first[k] + c):
            block[i] = k
    for k in range(top + 1, n):
        count[k] = 1.0


@numba.njit(cache=True, nogil=True)
def _argsort_descending(x: np.ndarray, order: np.ndarray) -> None:
    """Stable descending order of ``x`` into ``order``: insertion sort for short rows."""
    n = x.shape[0]
    if n > 48:
        order[:] = np.argsort(-x, kind="mergesort")
        return
    for i in range(n):
        v = x[i]
        j = i
        while j > 0 and x[order[j - 1]] < v:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i


@numba.njit(cache=True, nogil=True)
def project_rows(
    z: np.ndarray,
    w: np.ndarray,
    z_sorted: bool,
    out: np.ndarray,
    order: np.ndarray,
    block: np.ndarray,
    count: np.ndarray,
) -> None:  # pragma: no cover - compiled; checked against the torch version by the tests
    """The permutahedron projection of every row of ``z (B, n)`` onto ``P(w)``, ``w (B, n)``
    sorted in descending order: ``z`` sorted (stable, descending, unless ``z_sorted``) into
    ``order``, pooled in float64 into ``block``/``count`` (as :func:`pav_blocks`), and
    ``out = s - mean_block(s) + mean_block(w)`` put back in item order."""
    B, n = z.shape
    s = np.empty(n)
    wr = np.empty(n)
    means = np.empty((2, n))
    work = np.empty((2, n))
    iwork = np.empty((2, n), np.int64)
    for b in range(B):
        if z_sorted:
            for i in range(n):
                order[b, i] = i
        else:
            _argsort_descending(z[b], order[b])
        for i in range(n):
            s[i] = z[b, order[b, i]]
            wr[i] = w[b, i]
        _pav_row(s, wr, block[b], count[b], means, work, iwork)
        for i in range(n):  # (s - mean s) + mean w: no cancellation between huge s and small w
            k = block[b, i]
            out[b, order[b, i]] = (s[i] - means[0, k]) + means[1, k]


@numba.njit(cache=True, nogil=True)
def project_rows_backward(
    g: np.ndarray,
    order: np.ndarray,
    block: np.ndarray,
    count: np.ndarray,
    gz: np.ndarray,
    gw: np.ndarray,
) -> None:  # pragma: no cover - compiled; checked against the torch version by the tests
    """Backward of :func:`project_rows`: ``gz = g - A g`` in item order and ``gw = A g`` in the
    sorted order of ``w``, with ``A`` the averaging within the blocks (in descending order of
    ``z``)."""
    B, n = g.shape
    acc = np.empty(n)
    for b in range(B):
        acc[:] = 0.0
        for i in range(n):
            acc[block[b, i]] += g[b, order[b, i]]
        for i in range(n):
            a = acc[block[b, i]] / count[b, block[b, i]]
            gz[b, order[b, i]] = g[b, order[b, i]] - a
            gw[b, i] = a


@numba.njit(cache=True, nogil=True)
def topk_thresholds(z: np.ndarray, k: float, nu: np.ndarray) -> None:  # pragma: no cover
    """``nu[b]`` with ``sum_i clip(z[b, i] - nu[b], 0, 1) = k`` (``0 < k < n``, float64 rows).

    The breakpoints ``s_i`` and ``s_i - 1`` (``s`` = the row sorted descending) are visited
    from the top down, keeping the entries at 1 (``c1``), those at 1 or free (``cf``) and the
    sum of the free ones; at the first breakpoint where ``f = c1 + sum_free (s - nu) >= k`` the
    threshold lies on the segment just above it: ``nu = (sum_free + c1 - k) / (cf - c1)``, or
    the breakpoint itself when no entry is free there (as the torch version)."""
    B, n = z.shape
    for b in range(B):
        s = -np.sort(-z[b])
        c1 = 0
        cf = 0
        free_sum = 0.0
        i = 0  # next s_i entering "free"
        j = 0  # next s_j - 1 entering "at 1"
        result = -np.inf
        while i < n or j < n:
            if i < n and s[i] >= s[j] - 1.0:
                bp = s[i]
                enter = True
            else:
                bp = s[j] - 1.0
                enter = False
            if c1 + free_sum - (cf - c1) * bp >= k:
                if cf > c1:
                    result = max((free_sum + c1 - k) / (cf - c1), bp)
                else:
                    result = bp
                break
            if enter:
                cf += 1
                free_sum += s[i]
                i += 1
            else:
                c1 += 1
                free_sum -= s[j]
                j += 1
        nu[b] = result
