"""The per-chunk kernel: distances, nearest means and the additive statistics of the loss.

For one chunk of rows and the current means this computes, in one pass, everything an iteration
needs from that chunk: per-cluster weighted sums and counts, the partial loss, how many labels
changed since the previous means, and the rows farthest from their mean (to relocate empty
clusters). Each restart of ``n_init`` is a separate set of ``k`` means; all of them share one
pass over the rows.

Distances use ``||x||^2 - 2 x.mu^T + ||mu||^2``. A row's nearest mean is the one with the
smallest ``||mu||^2 - 2 x.mu``, computed in X's dtype (float32 rows: float32, as scikit-learn's
float32 path does); the row norms, the distances added to them and every sum are float64. One
compiled loop does it tile by tile: a tile of rows is transposed into a buffer that stays in
the L1 cache; the products of the tile's rows with a few means at a time are accumulated in
SIMD registers, vectorised over rows; each row's nearest and second-nearest value and label
are updated from them at once, so no (rows x means) matrix is ever written to memory; then the
rows' sums, counts and loss are accumulated in float64, in row order. For float32 rows the
vector code is written out explicitly (16-lane registers, see below); float64 rows go through
loops that LLVM vectorises.

Each product is one chain of fused multiply-adds over the features, in feature order, from
zero (the rounding of BLAS's GEMM kernels), and ``||mu||^2`` is added to it once: a row's
label and distance depend on that row and the means alone, never on how rows are split into
blocks or chunks.

Counting changed labels needs every row's label under the previous means. A fit evaluates the
same persisted chunk arrays pass after pass, so the labels of the last pass over each array are
remembered (``_LabelMemo``) and compared; otherwise rows whose label provably did not change
are skipped and the others get their previous label recomputed.

A chunk read from Parquet for one pass need not become a matrix of rows first: the pass reads
its float32 columns in place (``ColumnChunk``), each tile copied from them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, models, overload, register_model

__all__ = [
    "ChunkStats",
    "ColumnChunk",
    "NonFiniteError",
    "add_stats",
    "assign_labels",
    "block_rows_for",
    "chunk_stats",
    "columns_to_rows",
    "combine_stats",
    "origin_from_range",
    "release_thread_buffers",
    "row_sq_norms",
    "thread_buffer",
    "with_farthest",
]

#: Bytes of one block's working set (rows of X plus their distances); about half of a
#: typical per-core L2 cache, so the distance block is reduced while it is still in cache.
_BLOCK_BYTES = 1 << 20

#: Bytes of one tile's working set in the compiled pass (the tile's rows transposed, four
#: product accumulators and, per row, the best and second-best distance and label): under a
#: typical 32-48 KiB L1 data cache, so the products of every mean are formed from L1.
_TILE_BYTES = 40 << 10


def block_rows_for(n_columns: int, n_features: int, itemsize: int) -> int:
    """Rows per block so that a block of X and of its distances fits ``_BLOCK_BYTES``.

    The compiled pass never materialises the distance block; this bounds its tiles from above
    (see ``_tile_rows``).
    """
    rows = _BLOCK_BYTES // (itemsize * (n_columns + n_features))
    return int(min(max(rows, 256), 16384))


def _tile_rows(n_columns: int, n_features: int, itemsize: int) -> int:
    """Rows per tile of the compiled pass: a multiple of 32 (whole blocks of the SIMD path),
    the working set within ``_TILE_BYTES``, and never more than ``block_rows_for``."""
    per_row = itemsize * (n_features + 4) + 24
    rows = min(_TILE_BYTES // per_row, block_rows_for(n_columns, n_features, itemsize))
    return int(max(32, rows // 32 * 32))


@dataclass
class ChunkStats:
    """Additive statistics of the loss for ``n_init`` sets of ``k`` means.

    Attributes
    ----------
    sums : ndarray of shape (n_init, k, d), float64
        Weighted sum of the rows nearest to each mean.
    counts : ndarray of shape (n_init, k), float64
        Total weight of the rows nearest to each mean.
    loss : ndarray of shape (n_init,), float64
        Weighted sum of squared distances to the nearest mean.
    changed : ndarray of shape (n_init,), int64
        Rows whose nearest mean differs from their nearest previous mean (-1: no previous).
    far_dist, far_rows, far_index :
        The rows farthest from their own mean, per restart, best first: squared distances
        (n_init, m), the rows themselves (n_init, m, d) and their global indices (n_init, m).
    n_rows : int
        Rows seen.
    sq_total : float
        Weighted sum of squared row norms (with ``sums`` and ``counts`` it gives the variance).
    """

    sums: np.ndarray
    counts: np.ndarray
    loss: np.ndarray
    changed: np.ndarray
    far_dist: np.ndarray
    far_rows: np.ndarray
    far_index: np.ndarray
    n_rows: int = 0
    sq_total: float = 0.0


# The compiled pass. ``fastmath={"contract"}`` only lets LLVM fuse ``a + s * x`` into one fused
# multiply-add (no reassociation, no other relaxation), and only in the two product loops: the
# sums, loss and changed-label bounds are compiled without it, so they round exactly as written.


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _products4(XT, b, S2, j, A):  # pragma: no cover
    """``A[c, :b] = XT[:, :b].T @ S2[j + c]`` for c < 4: per row one fused multiply-add chain
    over the features, in order, from zero."""
    d = XT.shape[0]
    a0 = A[0]
    a1 = A[1]
    a2 = A[2]
    a3 = A[3]
    for ii in range(b):
        a0[ii] = 0
        a1[ii] = 0
        a2[ii] = 0
        a3[ii] = 0
    f = 0
    while f + 4 <= d:
        x0 = XT[f]
        x1 = XT[f + 1]
        x2 = XT[f + 2]
        x3 = XT[f + 3]
        p0, p1, p2, p3 = S2[j, f], S2[j, f + 1], S2[j, f + 2], S2[j, f + 3]
        q0, q1, q2, q3 = S2[j + 1, f], S2[j + 1, f + 1], S2[j + 1, f + 2], S2[j + 1, f + 3]
        r0, r1, r2, r3 = S2[j + 2, f], S2[j + 2, f + 1], S2[j + 2, f + 2], S2[j + 2, f + 3]
        t0, t1, t2, t3 = S2[j + 3, f], S2[j + 3, f + 1], S2[j + 3, f + 2], S2[j + 3, f + 3]
        for ii in range(b):
            u0 = x0[ii]
            u1 = x1[ii]
            u2 = x2[ii]
            u3 = x3[ii]
            a0[ii] = (((a0[ii] + p0 * u0) + p1 * u1) + p2 * u2) + p3 * u3
            a1[ii] = (((a1[ii] + q0 * u0) + q1 * u1) + q2 * u2) + q3 * u3
            a2[ii] = (((a2[ii] + r0 * u0) + r1 * u1) + r2 * u2) + r3 * u3
            a3[ii] = (((a3[ii] + t0 * u0) + t1 * u1) + t2 * u2) + t3 * u3
        f += 4
    while f < d:
        x0 = XT[f]
        p0, q0, r0, t0 = S2[j, f], S2[j + 1, f], S2[j + 2, f], S2[j + 3, f]
        for ii in range(b):
            u0 = x0[ii]
            a0[ii] = a0[ii] + p0 * u0
            a1[ii] = a1[ii] + q0 * u0
            a2[ii] = a2[ii] + r0 * u0
            a3[ii] = a3[ii] + t0 * u0
        f += 1


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _products1(XT, b, S2, j, A):  # pragma: no cover
    """``A[0, :b] = XT[:, :b].T @ S2[j]``, rounded as in ``_products4``."""
    d = XT.shape[0]
    a0 = A[0]
    for ii in range(b):
        a0[ii] = 0
    f = 0
    while f + 4 <= d:
        x0 = XT[f]
        x1 = XT[f + 1]
        x2 = XT[f + 2]
        x3 = XT[f + 3]
        p0, p1, p2, p3 = S2[j, f], S2[j, f + 1], S2[j, f + 2], S2[j, f + 3]
        for ii in range(b):
            a0[ii] = (((a0[ii] + p0 * x0[ii]) + p1 * x1[ii]) + p2 * x2[ii]) + p3 * x3[ii]
        f += 4
    while f < d:
        x0 = XT[f]
        p0 = S2[j, f]
        for ii in range(b):
            a0[ii] = a0[ii] + p0 * x0[ii]
        f += 1


@numba.njit(nogil=True, cache=True)
def _better(v, j, bo, so, ao):  # pragma: no cover
    """One mean's distance ``v`` (label ``j``) against a row's best ``bo`` (label ``ao``) and
    second-best ``so``: the first strictly smaller value wins, so ties keep the lower label,
    and the second-best is the second smallest value (a tie with the best included). Written
    as min/max so that it compiles to branch-free SIMD code."""
    so = min(so, max(bo, v))
    if v < bo:
        ao = j
    bo = min(bo, v)
    return bo, so, ao


@numba.njit(nogil=True, cache=True)
def _nearest(A, n_means, b, cn, jj, j, best, second, arg):  # pragma: no cover
    """Fold the products ``A[:n_means, :b]`` of means ``jj..`` (labels ``j..``) into each row's
    best and second-best ``cn - 2 x.mu`` (``A`` holds ``-2 x.mu``), in float64."""
    if n_means == 4:
        c0, c1, c2, c3 = cn[jj], cn[jj + 1], cn[jj + 2], cn[jj + 3]
        a0 = A[0]
        a1 = A[1]
        a2 = A[2]
        a3 = A[3]
        for ii in range(b):
            bo, so, ao = best[ii], second[ii], arg[ii]
            bo, so, ao = _better(c0 + np.float64(a0[ii]), j, bo, so, ao)
            bo, so, ao = _better(c1 + np.float64(a1[ii]), j + 1, bo, so, ao)
            bo, so, ao = _better(c2 + np.float64(a2[ii]), j + 2, bo, so, ao)
            bo, so, ao = _better(c3 + np.float64(a3[ii]), j + 3, bo, so, ao)
            best[ii], second[ii], arg[ii] = bo, so, ao
    else:
        c0 = cn[jj]
        a0 = A[0]
        for ii in range(b):
            bo, so, ao = _better(c0 + np.float64(a0[ii]), j, best[ii], second[ii], arg[ii])
            best[ii], second[ii], arg[ii] = bo, so, ao


@numba.njit(nogil=True, cache=True)
def _tile_nearest(XT, b, S2, cn, base, k, A, best, second, arg):  # pragma: no cover
    """Nearest and second-nearest of means ``base..base+k`` for the ``b`` rows of ``XT``."""
    for ii in range(b):
        best[ii] = np.inf
        second[ii] = np.inf
        arg[ii] = 0
    j = 0
    while j + 4 <= k:
        _products4(XT, b, S2, base + j, A)
        _nearest(A, 4, b, cn, base + j, j, best, second, arg)
        j += 4
    while j < k:
        _products1(XT, b, S2, base + j, A)
        _nearest(A, 1, b, cn, base + j, j, best, second, arg)
        j += 1


# --------------------------------------------------------------------------------------------
# Explicit SIMD for float32 rows.
#
# LLVM's loop vectoriser keeps to 256-bit vectors on current x86 server cores and keeps loop
# accumulators in memory; the float32 path below instead spells its inner loops with LLVM
# vector types, so the products of a block of rows with a group of means stay in registers
# over all features, and each row's running best/second-best/label live in registers over all
# means. The block's shape follows the registers of the CPU that numba compiles for: with
# AVX-512's thirty-two 512-bit registers, 32 rows by 8 means (sixteen accumulators); with
# sixteen 256-bit registers (AVX2: AMD before Zen 4, many cloud machines), LLVM splits each
# 16-lane vector in two, and that shape's 32 accumulators spilled to memory at every
# multiply-add, so there the block is 16 rows by 6 means (twelve 256-bit halves; the
# products and nearest means of a pass 1.48x as fast on a Zen 1 core). The products are
# ``llvm.fma`` chains over the features, in order, from zero: the same rounding as the scalar
# path (and as BLAS), on every CPU and with either shape. The comparison stays in float32 (one
# add, compare and two selects per 16 rows and mean): widening each product to float64 first
# took a fifth of the pass at k=64, d=32.
# --------------------------------------------------------------------------------------------


def _compiles_for_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512: the features it targets (the host's,
    unless ``NUMBA_CPU_FEATURES`` says otherwise), by which its cache of compiled code is keyed
    too, so code cached on one kind of CPU is never run with the other's block shape."""
    features = config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features()
    return "+avx512f" in features.split(",")


#: Which block shape the float32 pass compiles: 32 rows x 8 means (AVX-512) or 16 x 6.
_WIDE_REGISTERS = _compiles_for_avx512()


class _Vec(types.Type):
    def __init__(self, name: str, lanes: int, element: ir.Type) -> None:
        self.lanes = lanes
        self.llvm = ir.VectorType(element, lanes)
        super().__init__(name=name)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _vec_type, (self.name,)


def _vec_type(name: str) -> Any:
    """The vector type of that name, for unpickling. numba's on-disk cache pickles the
    signatures it compiled and unpickles an index before checking that it is current; by
    class, an index written by a version of this module that had other vector types would
    fail to load (AttributeError) instead of being discarded as stale. A name no longer
    defined gives a plain string, which matches no signature."""
    return next((t for t in (_f32x16, _f64x8, _i32x16) if t.name == name), name)


class _F32x16(_Vec):
    def __init__(self) -> None:
        super().__init__("kmeans_gd.f32x16", 16, ir.FloatType())


class _F64x8(_Vec):
    def __init__(self) -> None:
        super().__init__("kmeans_gd.f64x8", 8, ir.DoubleType())


class _I32x16(_Vec):
    def __init__(self) -> None:
        super().__init__("kmeans_gd.i32x16", 16, ir.IntType(32))


_f32x16, _f64x8, _i32x16 = _F32x16(), _F64x8(), _I32x16()


class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # type: ignore[no-untyped-def]
        super().__init__(dmm, fe_type, fe_type.llvm)


for _cls in (_F32x16, _F64x8, _I32x16):
    register_model(_cls)(_VecModel)


def _lanes(n: int, values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(ir.IntType(32), n), values)


def _vec_pointer(context, builder, aryty, ary, i, vt):  # type: ignore[no-untyped-def]
    """Pointer to ``vt.lanes`` consecutive elements of a 1-D array from index ``i``."""
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(a.data, [i]), vt.llvm.as_pointer())


def _loader(vt):  # type: ignore[no-untyped-def]
    @intrinsic
    def load(typingctx, arr, i):  # type: ignore[no-untyped-def]
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return builder.load(_vec_pointer(context, builder, sig.args[0], args[0], args[1], vt),
                                align=4)  # fmt: skip

        return vt(arr, types.intp), codegen

    return load


def _storer(vt):  # type: ignore[no-untyped-def]
    @intrinsic
    def store(typingctx, arr, i, v):  # type: ignore[no-untyped-def]
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            ptr = _vec_pointer(context, builder, sig.args[0], args[0], args[1], vt)
            builder.store(args[2], ptr, align=4)
            return context.get_dummy_value()

        return types.void(arr, types.intp, vt), codegen

    return store


def _splatter(vt, scalar):  # type: ignore[no-untyped-def]
    @intrinsic
    def splat(typingctx, x):  # type: ignore[no-untyped-def]
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            x = context.cast(builder, args[0], sig.args[0], scalar)
            v = builder.insert_element(ir.Constant(vt.llvm, ir.Undefined), x,
                                       ir.Constant(ir.IntType(32), 0))  # fmt: skip
            return builder.shuffle_vector(v, ir.Constant(vt.llvm, ir.Undefined),
                                          _lanes(vt.lanes, [0] * vt.lanes))  # fmt: skip

        return vt(x), codegen

    return splat


_load16 = _loader(_f32x16)
_store16 = _storer(_f32x16)
_store_f64x8 = _storer(_f64x8)
_store_i32x16 = _storer(_i32x16)
_splat16 = _splatter(_f32x16, types.float32)
_splat_f64x8 = _splatter(_f64x8, types.float64)
_splat_i32x16 = _splatter(_i32x16, types.int32)


@intrinsic
def _fma16(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """``a * b + c`` rounded once, lane by lane."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        t = _f32x16.llvm
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(t, [t, t, t]), "llvm.fma.v16f32"
        )
        return builder.call(fn, args)

    return _f32x16(_f32x16, _f32x16, _f32x16), codegen


@intrinsic
def _sub16(typingctx, a, b):  # type: ignore[no-untyped-def]
    """``a - b``, lane by lane."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.fsub(args[0], args[1])

    return _f32x16(_f32x16, _f32x16), codegen


@intrinsic
def _prefetch(typingctx, arr, i):  # type: ignore[no-untyped-def]
    """Hint the cache line holding element ``i`` of ``arr``'s data (flat, C order) into L1."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
            "llvm.prefetch.p0",
        )
        # read, keep in all cache levels, data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@intrinsic
def _store_wide16(typingctx, arr, i, v):  # type: ignore[no-untyped-def]
    """``arr[i:i+16] = float64(v)`` for a float64 array."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        wide = ir.VectorType(ir.DoubleType(), 16)
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), wide.as_pointer())
        builder.store(builder.fpext(args[2], wide), ptr, align=8)
        return context.get_dummy_value()

    return types.void(arr, types.intp, _f32x16), codegen


def _extender(high: bool):  # type: ignore[no-untyped-def]
    @intrinsic
    def extend(typingctx, a):  # type: ignore[no-untyped-def]
        """``float64(a[lanes])`` for the low or high 8 lanes of ``a``."""

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            half = builder.shuffle_vector(args[0], ir.Constant(_f32x16.llvm, ir.Undefined),
                                          _lanes(8, list(range(8 * high, 8 * high + 8))))  # fmt: skip
            return builder.fpext(half, _f64x8.llvm)

        return _f64x8(_f32x16), codegen

    return extend


_extend_low = _extender(False)
_extend_high = _extender(True)
_load_f64x8 = _loader(_f64x8)


@intrinsic
def _add_f64x8(typingctx, a, b):  # type: ignore[no-untyped-def]
    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.fadd(*args)

    return _f64x8(_f64x8, _f64x8), codegen


@intrinsic
def _mul_f64x8(typingctx, a, b):  # type: ignore[no-untyped-def]
    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.fmul(*args)

    return _f64x8(_f64x8, _f64x8), codegen


@intrinsic
def _fold(typingctx, p, c, j, bo, so, ao, want_second):  # type: ignore[no-untyped-def]
    """``_better`` on 16 lanes for ``v = p + c``: returns (best, second, label), the second
    only when asked."""
    ret = types.Tuple((_f32x16, _f32x16, _i32x16))

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        p, c, j, bo, so, ao, want = args
        v = builder.fadd(p, c)
        less = builder.fcmp_ordered("<", v, bo)
        # min(so, max(bo, v)) with the comparisons of Python's min and max
        t = builder.select(builder.fcmp_ordered(">", v, bo), v, bo)
        new_so = builder.select(builder.fcmp_ordered("<", t, so), t, so)
        so = builder.select(want, new_so, so)
        return context.make_tuple(builder, ret, [builder.select(less, v, bo), so,
                                                 builder.select(less, j, ao)])  # fmt: skip

    return ret(_f32x16, _f32x16, _i32x16, _f32x16, _f32x16, _i32x16, types.boolean), codegen


def _shuffle_transpose(builder, rows):  # type: ignore[no-untyped-def]
    """Transpose n vectors of n lanes in place (``rows[i][c]`` becomes ``rows[c][i]``)."""
    n = len(rows)
    h = n // 2
    while h:  # swap the off-diagonal h x h blocks of every 2h x 2h block
        for i in range(n):
            if i & h:
                continue
            lo = [c if not c & h else n + c - h for c in range(n)]
            hi = [c + h if not c & h else n + c for c in range(n)]
            a, b = rows[i], rows[i + h]
            rows[i] = builder.shuffle_vector(a, b, _lanes(n, lo))
            rows[i + h] = builder.shuffle_vector(a, b, _lanes(n, hi))
        h //= 2


def _transpose16_codegen(context, builder, sources, oty, out, i0, j):  # type: ignore[no-untyped-def]
    """Load 16 float32 vectors from the pointers ``sources``, transpose them, and store vector
    ``i`` at ``out[i0 + i, j:j + 16]``.

    Without AVX-512 it goes by four 8 x 8 blocks: the 16-lane shuffles, split by LLVM into
    256-bit ones, took 1.6 times as long on a Zen 1 core."""
    o = context.make_array(oty)(context, builder, out)
    n = 16 if _WIDE_REGISTERS else 8
    vp = ir.VectorType(ir.FloatType(), n).as_pointer()
    for r0 in range(0, 16, n):  # rows of the source block, columns of the output
        for c0 in range(0, 16, n):  # and the other way round
            offset = [ir.Constant(ir.IntType(64), c0)]
            rows = [builder.load(builder.bitcast(builder.gep(sources[r0 + r], offset), vp), align=4)
                    for r in range(n)]  # fmt: skip
            _shuffle_transpose(builder, rows)
            for c in range(n):
                row = builder.add(i0, ir.Constant(i0.type, c0 + c))
                col = builder.add(j, ir.Constant(j.type, r0))
                ptr = cgutils.get_item_pointer(context, builder, oty, o, [row, col])
                builder.store(rows[c], builder.bitcast(ptr, vp), align=4)
    return context.get_dummy_value()


def _column_pointer(context, builder, aty, addrs, j, r):  # type: ignore[no-untyped-def]
    """``float*`` to row ``r`` of the float32 column whose address is ``addrs[j]``."""
    a = context.make_array(aty)(context, builder, addrs)
    address = builder.load(cgutils.get_item_pointer(context, builder, aty, a, [j]))
    base = builder.inttoptr(address, ir.FloatType().as_pointer())
    return builder.gep(base, [r])


@intrinsic
def _gather16(typingctx, addrs, j0, r0, out, o0):  # type: ignore[no-untyped-def]
    """``out[o0 + i, j0 + c] = column j0 + c at row r0 + i`` for i, c < 16, where column j is
    the float32 array at address ``addrs[j]`` (``out``'s rows contiguous)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        aty, _, _, oty, _ = sig.args
        addrs_, j0_, r0_, out_, o0_ = args
        one = ir.Constant(j0_.type, 1)
        sources, j = [], j0_
        for _ in range(16):
            sources.append(_column_pointer(context, builder, aty, addrs_, j, r0_))
            j = builder.add(j, one)
        return _transpose16_codegen(context, builder, sources, oty, out_, o0_, j0_)

    return types.void(addrs, types.intp, types.intp, out, types.intp), codegen


@intrinsic
def _column_value(typingctx, addrs, j, r):  # type: ignore[no-untyped-def]
    """Row ``r`` of the float32 column at address ``addrs[j]``."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.load(_column_pointer(context, builder, sig.args[0], *args))

    return types.float32(addrs, types.intp, types.intp), codegen


@intrinsic
def _transpose16(typingctx, X, r0, c0, XT, t0):  # type: ignore[no-untyped-def]
    """``XT[c0 + c, t0 + i] = X[r0 + i, c0 + c]`` for i, c < 16 (X's rows contiguous)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        xty, _, _, tty, _ = sig.args
        X_, r0_, c0_, XT_, t0_ = args
        x = context.make_array(xty)(context, builder, X_)
        one = ir.Constant(r0_.type, 1)
        sources, r = [], r0_
        for _ in range(16):
            sources.append(cgutils.get_item_pointer(context, builder, xty, x, [r, c0_]))
            r = builder.add(r, one)
        return _transpose16_codegen(context, builder, sources, tty, XT_, c0_, t0_)

    return types.void(X, types.intp, types.intp, XT, types.intp), codegen


@numba.njit(nogil=True, cache=True)
def _transpose32(src, r0, p, dst):  # pragma: no cover
    """``dst[c, i] = src[r0 + i, c]`` for ``i < p`` and every column ``c`` of float32 ``src``,
    by 16 x 16 blocks in registers (each row of ``src`` and of ``dst`` contiguous)."""
    q = src.shape[1]
    full_r = p // 16 * 16
    full_c = q // 16 * 16
    for i0 in range(0, full_r, 16):
        for c0 in range(0, full_c, 16):
            _transpose16(src, r0 + i0, c0, dst, i0)
        for c in range(full_c, q):
            for i in range(i0, i0 + 16):
                dst[c, i] = src[r0 + i, c]
    for i in range(full_r, p):
        for c in range(q):
            dst[c, i] = src[r0 + i, c]


@numba.njit(nogil=True, cache=True)
def _transpose_tile32(X, start, b, XT):  # pragma: no cover
    """Rows ``start..start+b`` of float32 X into the columns of XT, zero-padded to a multiple
    of 32 columns."""
    d = X.shape[1]
    _transpose32(X, start, b, XT)
    padded = (b + 31) // 32 * 32
    for f in range(d):
        for ii in range(b, padded):
            XT[f, ii] = 0


@numba.njit(nogil=True, cache=True)
def _fma32(mu, x, y, p, q):  # pragma: no cover
    """One feature of one mean into the products of 32 rows: ``p += mu * x``, ``q += mu * y``."""
    m = _splat16(mu)
    return _fma16(m, x, p), _fma16(m, y, q)


@numba.njit(nogil=True, cache=True)
def _fold32(p, q, c, j, st, want_second):  # pragma: no cover
    """Fold one mean's ``-2 x.mu`` for 32 rows (``p``: rows 0-15, ``q``: 16-31) and its
    squared norm ``c`` into the state (best, second, label per 16 rows)."""
    b0, b1, s0, s1, a0, a1 = st
    cc = _splat16(np.float32(c))
    label = _splat_i32x16(np.int32(j))
    b0, s0, a0 = _fold(p, cc, label, b0, s0, a0, want_second)
    b1, s1, a1 = _fold(q, cc, label, b1, s1, a1, want_second)
    return b0, b1, s0, s1, a0, a1


@numba.njit(nogil=True, cache=True)
def _tile_nearest32(
    XT, b, S2, cn, base, k, best, second, arg, want_second, X, pf_lo, pf_hi
):  # pragma: no cover
    """``_tile_nearest32_body`` compiled twice, with and without the second-best value: with
    ``want_second`` a runtime flag, LLVM computed the second-best on every pass (a max and a
    min more per 16 rows and mean: 6 vector operations beside the d multiply-adds instead of
    4), which cost 3.5-4% of a pass at k=64, d=32."""
    if want_second:
        _tile_nearest32_body(XT, b, S2, cn, base, k, best, second, arg, True, X, pf_lo, pf_hi)
    else:
        _tile_nearest32_body(XT, b, S2, cn, base, k, best, second, arg, False, X, pf_lo, pf_hi)


@numba.njit(nogil=True, cache=True, inline="always")
def _tile_nearest32_body(
    XT, b, S2, cn, base, k, best, second, arg, want_second, X, pf_lo, pf_hi
):  # pragma: no cover
    """``_tile_nearest`` for float32, 32 rows at a time (XT zero-padded to whole blocks):
    the products of 32 rows with 8 means (then one at a time for the last ``k % 8``)
    accumulate in registers over all features, then fold into the rows' best, second-best
    (``want_second``) and label, kept in registers over all means.

    Elements ``pf_lo..pf_hi`` of X (the next tile's rows) are prefetched a slice per block of
    32 rows, so that reading them overlaps the products rather than stalling the next
    transpose (4% of a pass); within the block, a few cache lines before each group of 8
    means: the block's whole slice issued at once left a pass 5-10% slower."""
    d = XT.shape[0]
    inf = _splat16(np.float32(np.inf))
    zero = _splat16(np.float32(0))
    groups = max(k // 8, 1)
    pf_step = -(-2 * d // groups) * 16  # elements per group of means: whole 64-byte lines
    for i0 in range(0, b, 32):
        i1 = i0 + 16
        pf = pf_lo + i0 * d
        pf_end = min(pf + 32 * d, pf_hi)
        # running best, second and label of rows i0+0..15 and i0+16..31
        st = (inf, inf, inf, inf, _splat_i32x16(np.int32(0)), _splat_i32x16(np.int32(0)))
        j = 0
        while j + 8 <= k:
            jj = base + j
            for e in range(pf, min(pf + pf_step, pf_end), 16):
                _prefetch(X, e)
            pf += pf_step
            p0, p1, p2, p3, q0, q1, q2, q3 = zero, zero, zero, zero, zero, zero, zero, zero
            p4, p5, p6, p7, q4, q5, q6, q7 = zero, zero, zero, zero, zero, zero, zero, zero
            for f in range(d):
                row = XT[f]
                x = _load16(row, i0)
                y = _load16(row, i1)
                p0, q0 = _fma32(S2[jj, f], x, y, p0, q0)
                p1, q1 = _fma32(S2[jj + 1, f], x, y, p1, q1)
                p2, q2 = _fma32(S2[jj + 2, f], x, y, p2, q2)
                p3, q3 = _fma32(S2[jj + 3, f], x, y, p3, q3)
                p4, q4 = _fma32(S2[jj + 4, f], x, y, p4, q4)
                p5, q5 = _fma32(S2[jj + 5, f], x, y, p5, q5)
                p6, q6 = _fma32(S2[jj + 6, f], x, y, p6, q6)
                p7, q7 = _fma32(S2[jj + 7, f], x, y, p7, q7)
            st = _fold32(p0, q0, cn[jj], j, st, want_second)
            st = _fold32(p1, q1, cn[jj + 1], j + 1, st, want_second)
            st = _fold32(p2, q2, cn[jj + 2], j + 2, st, want_second)
            st = _fold32(p3, q3, cn[jj + 3], j + 3, st, want_second)
            st = _fold32(p4, q4, cn[jj + 4], j + 4, st, want_second)
            st = _fold32(p5, q5, cn[jj + 5], j + 5, st, want_second)
            st = _fold32(p6, q6, cn[jj + 6], j + 6, st, want_second)
            st = _fold32(p7, q7, cn[jj + 7], j + 7, st, want_second)
            j += 8
        for e in range(pf, pf_end, 16):  # what the groups left (k < 8)
            _prefetch(X, e)
        while j < k:
            jj = base + j
            p0, q0 = zero, zero
            for f in range(d):
                row = XT[f]
                p0, q0 = _fma32(S2[jj, f], _load16(row, i0), _load16(row, i1), p0, q0)
            st = _fold32(p0, q0, cn[jj], j, st, want_second)
            j += 1
        b0, b1, s0, s1, a0, a1 = st
        _store_wide16(best, i0, b0)
        _store_wide16(best, i1, b1)
        _store_wide16(second, i0, s0)
        _store_wide16(second, i1, s1)
        _store_i32x16(arg, i0, a0)
        _store_i32x16(arg, i1, a1)


@numba.njit(nogil=True, cache=True)
def _fold16(p, c, j, st, want_second):  # pragma: no cover
    """``_fold32`` for 16 rows: the state is (best, second, label) of those rows."""
    b0, s0, a0 = st
    return _fold(p, _splat16(np.float32(c)), _splat_i32x16(np.int32(j)), b0, s0, a0, want_second)


@numba.njit(nogil=True, cache=True)
def _tile_nearest16(
    XT, b, S2, cn, base, k, best, second, arg, want_second, X, pf_lo, pf_hi
):  # pragma: no cover
    """``_tile_nearest32`` for CPUs with sixteen 256-bit registers: 16 rows at a time."""
    if want_second:
        _tile_nearest16_body(XT, b, S2, cn, base, k, best, second, arg, True, X, pf_lo, pf_hi)
    else:
        _tile_nearest16_body(XT, b, S2, cn, base, k, best, second, arg, False, X, pf_lo, pf_hi)


@numba.njit(nogil=True, cache=True, inline="always")
def _tile_nearest16_body(
    XT, b, S2, cn, base, k, best, second, arg, want_second, X, pf_lo, pf_hi
):  # pragma: no cover
    """``_tile_nearest32_body`` with blocks of 16 rows and groups of 6 means, then pairs, then
    one (a pair's four 256-bit chains still hide most of the multiply-add's latency; a single
    mean's two do not). The same products and comparisons, in the same order per row and
    mean, so the same results bit for bit."""
    d = XT.shape[0]
    inf = _splat16(np.float32(np.inf))
    zero = _splat16(np.float32(0))
    groups = max(k // 6, 1)
    pf_step = -(-d // groups) * 16  # elements per group of means: whole 64-byte lines
    for i0 in range(0, b, 16):
        pf = pf_lo + i0 * d
        pf_end = min(pf + 16 * d, pf_hi)
        st = (inf, inf, _splat_i32x16(np.int32(0)))
        j = 0
        while j + 6 <= k:
            jj = base + j
            for e in range(pf, min(pf + pf_step, pf_end), 16):
                _prefetch(X, e)
            pf += pf_step
            p0, p1, p2, p3, p4, p5 = zero, zero, zero, zero, zero, zero
            for f in range(d):
                x = _load16(XT[f], i0)
                p0 = _fma16(_splat16(S2[jj, f]), x, p0)
                p1 = _fma16(_splat16(S2[jj + 1, f]), x, p1)
                p2 = _fma16(_splat16(S2[jj + 2, f]), x, p2)
                p3 = _fma16(_splat16(S2[jj + 3, f]), x, p3)
                p4 = _fma16(_splat16(S2[jj + 4, f]), x, p4)
                p5 = _fma16(_splat16(S2[jj + 5, f]), x, p5)
            st = _fold16(p0, cn[jj], j, st, want_second)
            st = _fold16(p1, cn[jj + 1], j + 1, st, want_second)
            st = _fold16(p2, cn[jj + 2], j + 2, st, want_second)
            st = _fold16(p3, cn[jj + 3], j + 3, st, want_second)
            st = _fold16(p4, cn[jj + 4], j + 4, st, want_second)
            st = _fold16(p5, cn[jj + 5], j + 5, st, want_second)
            j += 6
        for e in range(pf, pf_end, 16):  # what the groups left (k < 6)
            _prefetch(X, e)
        while j + 2 <= k:
            jj = base + j
            p0, p1 = zero, zero
            for f in range(d):
                x = _load16(XT[f], i0)
                p0 = _fma16(_splat16(S2[jj, f]), x, p0)
                p1 = _fma16(_splat16(S2[jj + 1, f]), x, p1)
            st = _fold16(p0, cn[jj], j, st, want_second)
            st = _fold16(p1, cn[jj + 1], j + 1, st, want_second)
            j += 2
        if j < k:
            p0 = zero
            for f in range(d):
                p0 = _fma16(_splat16(S2[base + j, f]), _load16(XT[f], i0), p0)
            st = _fold16(p0, cn[base + j], j, st, want_second)
        b0, s0, a0 = st
        _store_wide16(best, i0, b0)
        _store_wide16(second, i0, s0)
        _store_i32x16(arg, i0, a0)


@numba.njit(nogil=True, cache=True)
def _accumulate(R, r0, start, b, xt, w, has_w, best, arg, labels, d1, sums, counts, loss, count):
    # pragma: no cover
    """Rows ``start..start+b`` of one restart (their features: rows ``r0..r0+b`` of R; ``xt``:
    their squared norms): labels and clamped distances, then, row by row in order,
    ``counts[a] += w``, ``loss += w * dist`` and ``sums[a] += w * x`` (float64, the product
    rounded before the sum). With ``count``, ``labels`` holds the previous labels on entry and
    the rows whose label differs are counted as they are overwritten. Returns the loss and
    that count."""
    changed = 0
    for ii in range(b):
        dist = xt[ii] + best[ii]
        d1[start + ii] = max(dist, 0.0)
        if count:
            changed += labels[start + ii] != arg[ii]
        labels[start + ii] = arg[ii]
    for ii in range(b):
        i = start + ii
        a = arg[ii]
        wi = w[i] if has_w else 1.0
        counts[a] += wi
        loss += wi * d1[i]
        _add_row(sums[a], R[r0 + ii], wi, has_w)
    return loss, changed


@numba.njit(nogil=True, cache=True)
def _checksum(words, lo, hi):  # pragma: no cover
    """Wrapping sum of ``words[lo:hi]``, each XOR-ed with a multiple of its position (a
    change of any one word, or an exchange of two, changes it)."""
    h = np.uint64(0)
    # the multiple of the position as a running sum: the same value, without a 64-bit
    # vector multiply per word (1.6 times as fast)
    m = np.uint64(lo) * np.uint64(0x9E3779B97F4A7C15)
    part = words[lo:hi]
    for q in range(part.shape[0]):
        h += np.uint64(part[q]) ^ m
        m += np.uint64(0x9E3779B97F4A7C15)
    return h


# Which code a pass compiles is decided from the types alone, so each dtype and layout compiles
# only its own path: the explicit-SIMD one for float32 (rows contiguous for reading X), the
# auto-vectorised one otherwise.


def _transpose_tile(X, start, b, XT):  # pragma: no cover
    """Rows ``start..start+b`` of X into the columns of XT (padded for the SIMD path)."""


@overload(_transpose_tile, inline="always")
def _transpose_tile_impl(X, start, b, XT):  # type: ignore[no-untyped-def]
    if not isinstance(X, types.Array):
        return None
    if X.dtype == types.float32 and X.layout == "C":
        return lambda X, start, b, XT: _transpose_tile32(X, start, b, XT)

    pad = XT.dtype == types.float32  # the SIMD path reads whole blocks of 32 rows

    def transpose(X, start, b, XT):  # type: ignore[no-untyped-def]
        for ii in range(b):
            for f in range(X.shape[1]):
                XT[f, ii] = X[start + ii, f]
        if pad:
            for f in range(X.shape[1]):
                for ii in range(b, (b + 31) // 32 * 32):
                    XT[f, ii] = 0

    return transpose


class _Columns(NamedTuple):
    """A chunk's float32 feature columns as the compiled pass reads them, in place: row group
    ``g``'s column ``j`` is the array at address ``addrs[g, j]``, holding the chunk's rows
    ``bounds[g]..bounds[g + 1]``. ``origin[j]`` is subtracted from column j's values. The pass
    sets ``bad[0]`` to the first row holding NaN or an infinity (it stays -1 when none does)."""

    addrs: np.ndarray  # (groups, d) intp
    bounds: np.ndarray  # (groups + 1,) int64
    origin: np.ndarray  # (d,) float32
    bad: np.ndarray  # (1,) int64


@intrinsic
def _float32_pointer(typingctx, address):  # type: ignore[no-untyped-def]
    """The address (an integer) as a ``float*``."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], ir.FloatType().as_pointer())

    return types.CPointer(types.float32)(address), codegen


def _source_shape(X):  # pragma: no cover
    """(rows, features) of X: rows (an array) or ``_Columns``."""


@overload(_source_shape, inline="always")
def _source_shape_impl(X):  # type: ignore[no-untyped-def]
    if isinstance(X, types.Array):
        return lambda X: X.shape
    return lambda X: (X.bounds[-1], X.addrs.shape[1])


def _tile_end(X, start, tile):  # pragma: no cover
    """The end of the tile that starts at row ``start``: ``tile`` rows on, or the end of X or
    of the row group, whichever is first (a tile of ``_Columns`` is within one row group)."""


@overload(_tile_end, inline="always")
def _tile_end_impl(X, start, tile):  # type: ignore[no-untyped-def]
    if isinstance(X, types.Array):
        return lambda X, start, tile: min(X.shape[0], start + tile)

    def end(X, start, tile):  # type: ignore[no-untyped-def]
        g = np.searchsorted(X.bounds, start, side="right") - 1
        return min(X.bounds[g + 1], start + tile)

    return end


@overload(_transpose_tile, inline="always")
def _transpose_columns_impl(X, start, b, XT):  # type: ignore[no-untyped-def]
    if isinstance(X, types.Array):
        return None

    def gather(X, start, b, XT):  # type: ignore[no-untyped-def]
        g = np.searchsorted(X.bounds, start, side="right") - 1
        r0 = start - X.bounds[g]
        # as many rows of the next tile (the rest of this row group, or the next), prefetched
        # column by column while this tile is copied, to be in cache once its turn comes
        ng, nr = (g, r0 + b) if start + b < X.bounds[g + 1] else (g + 1, 0)
        n_next = 0 if ng >= X.addrs.shape[0] else X.bounds[ng + 1] - X.bounds[ng]
        pf_end = min(nr + b, n_next)
        full = b // 16 * 16
        for f in range(XT.shape[0]):
            column = numba.carray(_float32_pointer(X.addrs[g, f]), (r0 + b,))
            o = X.origin[f]
            row = XT[f]
            # in explicit lanes: the plain loop ran at the speed of scalar copies (24 ms per
            # million rows of 32 columns in cache, against 6.9)
            shift = _splat16(o)
            for ii in range(0, full, 16):
                _store16(row, ii, _sub16(_load16(column, r0 + ii), shift))
            for ii in range(full, b):
                row[ii] = column[r0 + ii] - o
            for ii in range(b, (b + 31) // 32 * 32):  # whole blocks for the SIMD path
                row[ii] = 0
            if nr < pf_end:
                following = numba.carray(_float32_pointer(X.addrs[ng, f]), (pf_end,))
                for e in range(nr, pf_end, 16):
                    _prefetch(following, e)

    return gather


def _rows_of_tile(X, start, XT, XR):  # pragma: no cover
    """The rows of the tile at ``start`` as ``_accumulate`` reads them: (array, index of the
    tile's first row in it). X's own rows; for ``_Columns``, XT transposed into XR."""


@overload(_rows_of_tile, inline="always")
def _rows_of_tile_impl(X, start, XT, XR):  # type: ignore[no-untyped-def]
    if isinstance(X, types.Array):
        return lambda X, start, XT, XR: (X, start)

    def transposed(X, start, XT, XR):  # type: ignore[no-untyped-def]
        _transpose32(XT, 0, XT.shape[0], XR)
        return XR, 0

    return transposed


def _check_tile(X, start, b, xt):  # pragma: no cover
    """For ``_Columns``, record the tile's first row whose squared norm ``xt`` is not finite:
    a row holding NaN or an infinity (a float32 value squared never overflows float64)."""


@overload(_check_tile, inline="always")
def _check_tile_impl(X, start, b, xt):  # type: ignore[no-untyped-def]
    if isinstance(X, types.Array):
        return lambda X, start, b, xt: None

    def check(X, start, b, xt):  # type: ignore[no-untyped-def]
        if X.bad[0] < 0:
            for ii in range(b):
                if not np.isfinite(xt[ii]):
                    X.bad[0] = start + ii
                    break

    return check


def _prefetch_source(X):  # pragma: no cover
    """The array whose next tile the products prefetch: X's rows (none for ``_Columns``)."""


@overload(_prefetch_source, inline="always")
def _prefetch_source_impl(X):  # type: ignore[no-untyped-def]
    if isinstance(X, types.Array):
        return lambda X: X
    return lambda X: np.empty((0, 1), dtype=np.float32)


def _nearest_tile(
    XT, b, S2, cn, base, k, A, best, second, arg, want_second, X, pf_lo, pf_hi
):  # pragma: no cover
    """Each row's nearest and second-nearest of means ``base..base+k``; meanwhile elements
    ``pf_lo..pf_hi`` of X are prefetched where X's rows are contiguous."""


@overload(_nearest_tile, inline="always")
def _nearest_tile_impl(XT, b, S2, cn, base, k, A, best, second, arg, want_second, X, pf_lo, pf_hi):  # type: ignore[no-untyped-def]
    if XT.dtype == types.float32:
        contiguous = X.layout == "C"

        tile_nearest = _tile_nearest32 if _WIDE_REGISTERS else _tile_nearest16

        def nearest32(XT, b, S2, cn, base, k, A, best, second, arg, want_second, X, pf_lo, pf_hi):  # type: ignore[no-untyped-def]
            hi = pf_hi if contiguous else pf_lo
            tile_nearest(XT, b, S2, cn, base, k, best, second, arg, want_second, X, pf_lo, hi)

        return nearest32

    def nearest(XT, b, S2, cn, base, k, A, best, second, arg, want_second, X, pf_lo, pf_hi):  # type: ignore[no-untyped-def]
        _tile_nearest(XT, b, S2, cn, base, k, A, best, second, arg)

    return nearest


def _add_row(row, x, wi, has_w):  # pragma: no cover
    """``row += wi * x`` (float64, each product rounded before the sum)."""


@overload(_add_row, inline="always")
def _add_row_impl(row, x, wi, has_w):  # type: ignore[no-untyped-def]
    simd = x.dtype == types.float32 and x.layout == "C"

    def add(row, x, wi, has_w):  # type: ignore[no-untyped-def]
        d = x.shape[0]
        wide = d // 16 * 16 if simd else 0
        if simd:
            weight = _splat_f64x8(wi)
            for f in range(0, wide, 16):
                v = _load16(x, f)
                lo = _extend_low(v)
                hi = _extend_high(v)
                if has_w:
                    lo = _mul_f64x8(weight, lo)
                    hi = _mul_f64x8(weight, hi)
                _store_f64x8(row, f, _add_f64x8(_load_f64x8(row, f), lo))
                _store_f64x8(row, f + 8, _add_f64x8(_load_f64x8(row, f + 8), hi))
        for f in range(wide, d):
            row[f] += wi * x[f]

    if simd:
        return add

    def add_plain(row, x, wi, has_w):  # type: ignore[no-untyped-def]
        for f in range(x.shape[0]):
            row[f] += wi * x[f]

    return add_plain


@numba.njit(nogil=True, cache=True)
def _fused_pass(
    X, words, S2, cn, xsq, w, k, tile, labels, d1, sums, counts, loss, sq_total,
    P2, pn, eps, pmax, shift, smax, changed, count_in_place, top, top_index, top_size, top_out,
):  # pragma: no cover
    """The whole pass over X, tile by tile; returns the checksum of ``words`` (X's bytes as
    32- or 64-bit words, or empty), taken while each tile is in cache (see ``_LabelMemo``).

    Each restart's rows of positive weight are offered, with their distance, to a bounded
    min-heap of the farthest (``top``, ``top_index``, ``top_size``; width 0: none), and
    ``top_out`` gets the largest distance left out of it (see ``_push``).

    ``S2`` is ``-2`` times all restarts' means stacked (n_init*k, d) in X's dtype, ``cn`` their
    squared norms. Writes labels and clamped best distances per restart and row, and adds to
    ``sums``, ``counts`` and ``loss`` (weights ``w``; none when empty). When ``P2`` is not
    empty (``-2`` times the previous means, ``pn`` their norms), a row whose label provably
    did not change (its margin to the second-nearest mean exceeds the means' moves, ``shift``
    per mean and ``smax`` their largest, with rounding ``slack``) is skipped, and every other
    row gets its previous label from the previous means: ``changed`` counts the differences.
    With ``count_in_place``, ``labels`` holds the previous labels on entry and ``changed``
    counts the rows whose label is overwritten by a different one.

    X is a matrix of rows, or ``_Columns`` (see ``ColumnChunk``), whose tiles never cross a
    row group.

    The rows' squared norms are taken from ``xsq``, or, when it is empty, computed from each
    transposed tile while it is in cache (``_tile_norms``, as ``row_sq_norms`` does: the same
    values); ``sq_total[0]`` gets their weighted sum, in row order.
    """
    n, d = _source_shape(X)
    n_init = S2.shape[0] // k
    has_w = w.shape[0] > 0
    check = P2.shape[0] > 0
    XT = np.empty((d, tile), dtype=S2.dtype)
    XU = np.empty((d, tile), dtype=S2.dtype)
    XR = np.empty((tile, d), dtype=S2.dtype)
    A = np.empty((4, tile), dtype=S2.dtype)
    PF = _prefetch_source(X)
    best = np.empty((n_init, tile))
    second = np.empty((n_init, tile))
    arg = np.empty((n_init, tile), dtype=np.int32)
    ubest = np.empty(tile)
    usecond = np.empty(tile)
    uarg = np.empty(tile, dtype=np.int32)
    unsure = np.empty((n_init, tile), dtype=np.int64)
    n_unsure = np.zeros(n_init, dtype=np.int64)
    xt = np.empty(tile)
    has_xsq = xsq.shape[0] > 0
    m_top = top.shape[1]
    per_row = words.shape[0] // n if n > 0 else 0
    h = np.uint64(0)
    start = 0
    while start < n:
        b = _tile_end(X, start, tile) - start
        _transpose_tile(X, start, b, XT)
        h += _checksum(words, start * per_row, (start + b) * per_row)
        if has_xsq:
            xt[:b] = xsq[start : start + b]
        else:
            _tile_norms(XT, b, xt)
        _check_tile(X, start, b, xt)
        for ii in range(b):
            sq_total[0] += w[start + ii] * xt[ii] if has_w else xt[ii]
        # the next tile's rows, fetched while this one's products are formed
        pf_lo = (start + tile) * d
        pf_hi = min(PF.shape[0], start + 2 * tile) * d
        for r in range(n_init):
            _nearest_tile(XT, b, S2, cn, r * k, k, A, best[r], second[r], arg[r], check,
                          PF, pf_lo, pf_hi if r == 0 else pf_lo)  # fmt: skip
        R, r0 = _rows_of_tile(X, start, XT, XR)
        for r in range(n_init):
            loss[r], ch = _accumulate(R, r0, start, b, xt, w, has_w, best[r], arg[r], labels[r],
                                      d1[r], sums[r], counts[r], loss[r], count_in_place)  # fmt: skip
            changed[r] += ch
        for r in range(n_init if m_top > 0 else 0):
            heap = top[r]
            if top_size[r] == m_top and not has_w:
                # the common case once the heap is full: no row of the tile gets in, and the
                # largest is all that is kept of them (a loop over the rows, storing the
                # running maximum at each, took 3% of the pass)
                far = _tile_max(d1[r], start, b)
                if not far > heap[0]:
                    top_out[r] = max(top_out[r], far)
                    continue
            for ii in range(b):
                i = start + ii
                v = d1[r, i]
                if has_w and not w[i] > 0:
                    continue
                if top_size[r] == m_top and not v > heap[0]:
                    # the common case once the heap is full: left out
                    top_out[r] = max(top_out[r], v)
                else:
                    _push(heap, top_index[r], top_size, top_out, r, v, i)
        n_unsure[:] = 0
        if check:
            for ii in range(b):
                i = start + ii
                xs = xt[ii]
                for r in range(n_init):
                    slack = eps * (xs + pmax[r] + 1.0)
                    own = np.sqrt(d1[r, i] + slack) + shift[r, arg[r, ii]]
                    other = np.sqrt(max(xs + second[r, ii] - slack, 0.0)) - smax[r]
                    if own >= other:
                        unsure[r, n_unsure[r]] = ii
                        n_unsure[r] += 1
        if check:
            for r in range(n_init):
                u = n_unsure[r]
                if u == 0:
                    continue
                for f in range(d):
                    for q in range(u):
                        XU[f, q] = XT[f, unsure[r, q]]
                    for q in range(u, (u + 31) // 32 * 32):  # whole blocks for the SIMD path
                        XU[f, q] = 0
                _nearest_tile(XU, u, P2, pn, r * k, k, A, ubest, usecond, uarg, False, PF, 0, 0)
                for q in range(u):
                    if uarg[q] != arg[r, unsure[r, q]]:
                        changed[r] += 1
        start += b
    return h


@numba.njit(nogil=True, cache=True)
def _tile_max(values, start, b):  # pragma: no cover
    """The largest of ``values[start : start + b]`` (``-inf`` if empty), in four running maxima
    so that each comparison waits on the one four rows back."""
    m0 = m1 = m2 = m3 = -np.inf
    end = start + b
    i = start
    while i + 4 <= end:
        m0 = max(m0, values[i])
        m1 = max(m1, values[i + 1])
        m2 = max(m2, values[i + 2])
        m3 = max(m3, values[i + 3])
        i += 4
    while i < end:
        m0 = max(m0, values[i])
        i += 1
    return max(max(m0, m1), max(m2, m3))


@numba.njit(nogil=True, cache=True)
def _tile_norms(XT, b, out):  # pragma: no cover
    """``out[i]``: the squared norm of column ``i < b`` of XT, summed in float64 in feature
    order (vectorised over the columns, each sum's order fixed)."""
    out[:b] = 0.0
    for f in range(XT.shape[0]):
        for ii in range(b):
            v = np.float64(XT[f, ii])
            out[ii] += v * v


@numba.njit(nogil=True, cache=True)
def _row_sq_norms(X, out):  # pragma: no cover
    n, d = X.shape
    tile = 256
    XT = np.empty((d, tile), dtype=X.dtype)
    for start in range(0, n, tile):
        b = min(tile, n - start)
        _transpose_tile(X, start, b, XT)
        _tile_norms(XT, b, out[start : start + b])


@numba.njit(nogil=True, cache=True)
def _gather_rows32(addrs, out, check, origin):  # pragma: no cover
    """``out[i, j] = column j at row i - origin[j]`` (columns: float32 arrays at ``addrs``;
    ``origin`` float32, empty: none), by 16 x 16 blocks in registers; with ``check``, returns
    the first column holding NaN or an infinity (-1: none), looked for block by block while
    the block's rows are in cache, where the origin is subtracted too."""
    m, d = out.shape
    full_c = d // 16 * 16
    acc = np.zeros(d, dtype=np.float32)
    block = 256
    for lo in range(0, m, block):
        hi = min(m, lo + block)
        full_hi = lo + (hi - lo) // 16 * 16
        for i0 in range(lo, full_hi, 16):
            for c0 in range(0, full_c, 16):
                _gather16(addrs, c0, i0, out, i0)
            for c in range(full_c, d):
                for i in range(i0, i0 + 16):
                    out[i, c] = _column_value(addrs, c, i)
        for i in range(full_hi, hi):
            for c in range(d):
                out[i, c] = _column_value(addrs, c, i)
        if check:
            # x - x is 0 for every finite x and NaN otherwise; NaN stays in the sum
            for i in range(lo, hi):
                for c in range(d):
                    acc[c] += out[i, c] - out[i, c]
        if origin.shape[0] > 0:
            for i in range(lo, hi):
                for c in range(d):
                    out[i, c] -= origin[c]
    for c in range(d):
        if acc[c] != 0:
            return c
    return -1


def columns_to_rows(
    columns: Sequence[np.ndarray],
    out: np.ndarray,
    *,
    check_finite: bool = False,
    origin: np.ndarray | None = None,
) -> int | None:
    """Copy columns (1-D arrays of ``out``'s length, or the rows of a features x rows array)
    into the rows of ``out`` (rows x features), less ``origin`` (one value per column, each
    difference rounded once to ``out``'s dtype).

    float32 columns into float32 rows go through the kernel's SIMD 16 x 16 transposition,
    read straight from each column's buffer (a 65536 x 32 Parquet row group: 1.2 ms, where
    staging the columns into one block first and transposing that took 1.8 ms, and NumPy's
    strided copy 2.5 ms); anything else through NumPy.

    With ``check_finite``, returns the index of the first column holding NaN or an infinity
    (None if there is none), checked while the rows are in cache.
    """
    shapes = {c.shape for c in columns}
    if len(shapes) > 1 or any(len(shape) != 1 for shape in shapes):
        raise ValueError(f"columns should be 1-D arrays of one length; got shapes {shapes}.")
    m = shapes.pop()[0] if shapes else 0
    if out.shape != (m, len(columns)):
        raise ValueError(f"out has shape {out.shape}; expected {(m, len(columns))}.")
    fast = out.dtype == np.float32 and out.flags.c_contiguous and all(
        c.dtype == np.float32 and c.strides[0] == 4 for c in columns
    )
    if origin is not None and origin.shape != (len(columns),):
        raise ValueError(f"origin has shape {origin.shape}; expected {(len(columns),)}.")
    # the float32 path subtracts in float32: exact for values within a factor 2 of an origin
    # that is a float32 value (Sterbenz), as ParquetDataset's origins are
    exact32 = origin is None or np.array_equal(origin.astype(np.float32), origin)
    if fast and exact32 and m > 0:
        addrs = np.array([c.ctypes.data for c in columns], dtype=np.intp)
        shift = np.empty(0, np.float32) if origin is None else origin.astype(np.float32)
        bad = _gather_rows32(addrs, out, check_finite, shift)
        return None if bad < 0 else int(bad)
    for j, c in enumerate(columns):
        if origin is None:
            out[:, j] = c
        else:
            np.subtract(c, origin[j], out=out[:, j], casting="unsafe")
    if not check_finite:
        return None
    finite = np.isfinite(out).all(axis=0)
    return None if finite.all() else int(np.argmin(finite))


def origin_from_range(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Per feature of range ``low..high``, the value to subtract from it before a fit: the
    midpoint, when the values lie farther from zero than they spread, else 0 (also when the
    range is unknown: NaN).

    float32 keeps about 7 significant digits. Coordinates such as 512345.6 +- 10 keep only two
    below their spread, and the distances ``||x||^2 - 2 x.mu + ||mu||^2`` cancel to noise (8
    blobs at an offset of 1e5: 3.5x the optimum's inertia from the optimum's own means);
    shifted, they keep all seven. The midpoint is a float32 value, so that shifting float32
    values near it is exact.
    """
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        mid = ((low + high) / 2).astype(np.float32).astype(np.float64)
        far = np.isfinite(mid) & (np.abs(mid) > high - low)
    return np.where(far, mid, 0.0)


def row_sq_norms(X: np.ndarray) -> np.ndarray:
    """Squared norm of each row, accumulated in float64.

    Compiled, by tiles of rows transposed as in the pass, which computes the same values
    itself when not given them. Each row's sum is taken in feature order, so a row's norm does
    not depend on the chunk it is in or on whether the pass computed it.
    """
    out = np.empty(X.shape[0], dtype=np.float64)
    _row_sq_norms(X, out)
    return out


class NonFiniteError(ValueError):
    """A chunk's features hold NaN or an infinity: ``column`` is the first column (in order)
    that does in the row group of the first row that does."""

    def __init__(self, column: int) -> None:
        super().__init__(f"column {column} holds NaN or an infinity.")
        self.column = column


class ColumnChunk:
    """A chunk of float32 features as columns, row group by row group (each a list of 1-D
    arrays, one per feature), which ``chunk_stats`` reads in place.

    A pass over a chunk read from Parquet would otherwise first copy its columns into a
    matrix of rows, out of cache. Read in place, each tile of rows is copied from the columns
    straight into the pass's transposed tile (the copy of a matrix of rows is a transposition
    of its own), and the next tile's columns are prefetched meanwhile. On two workers busy
    streaming 32 float32 features, k = 64, per million rows: filling the rows and the pass over
    them took 260-270 ms of CPU beyond the read, the pass in place 209-218 ms. ``origin`` (one
    value per feature, each a float32 value) is subtracted from the values as they are read.

    Supports what a pass needs of a matrix of rows: ``shape``, ``dtype`` and taking rows by
    an index array (``chunk[index]``).
    """

    def __init__(
        self, groups: Sequence[Sequence[np.ndarray]], origin: np.ndarray | None = None
    ) -> None:
        groups = [list(g) for g in groups]
        d = len(groups[0]) if groups else 0
        for g in groups:
            if len(g) != d or any(
                c.dtype != np.float32 or c.ndim != 1 or not c.flags.c_contiguous
                or len(c) != len(g[0])
                for c in g
            ):  # fmt: skip
                raise ValueError(
                    "each row group should be a list of the same number of contiguous 1-D"
                    " float32 arrays of one length."
                )
        shift = np.zeros(d, dtype=np.float32)
        if origin is not None:
            if np.shape(origin) != (d,) or not np.array_equal(np.float32(origin), origin):
                raise ValueError(f"origin should be {d} float32 values; got {origin!r}.")
            shift[:] = origin
        # empty groups would give tiles of no rows
        self._groups = [g for g in groups if len(g[0])]
        self._origin = shift
        lengths = [len(g[0]) for g in self._groups]
        self.shape = (int(sum(lengths)), d)
        self.dtype = np.dtype(np.float32)
        self.source = _Columns(
            np.array([[c.ctypes.data for c in g] for g in self._groups], dtype=np.intp).reshape(
                len(self._groups), d
            ),
            np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
            shift,
            np.full(1, -1, dtype=np.int64),
        )

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.shape[1]), dtype=np.float32)
        groups = np.searchsorted(self.source.bounds, index, side="right") - 1
        for g in np.unique(groups):
            at = np.flatnonzero(groups == g)
            rows = index[at] - self.source.bounds[g]
            for j, column in enumerate(self._groups[g]):
                out[at, j] = column[rows]
        out -= self._origin
        return out

    def raise_if_non_finite(self) -> None:
        """After a pass: raise NonFiniteError if it met a row holding NaN or an infinity."""
        row = int(self.source.bad[0])
        if row < 0:
            return
        g = int(np.searchsorted(self.source.bounds, row, side="right") - 1)
        for j, column in enumerate(self._groups[g]):
            with np.errstate(over="ignore", invalid="ignore"):
                if not np.isfinite(column - self._origin[j]).all():
                    raise NonFiniteError(j)
        raise AssertionError(f"row {row} was found not finite, yet no column of its row group is.")


#: An empty float64 array: "no weights", "no previous means" for the compiled pass.
_NONE = np.empty(0, dtype=np.float64)


class _ThreadBuffers:
    """One thread's buffers, by purpose (an object, so that it can be held weakly)."""

    __slots__ = ("__weakref__", "by_purpose")

    def __init__(self) -> None:
        self.by_purpose: dict[str, np.ndarray] = {}


_THREAD = threading.local()
#: Every live thread's buffers, so that they can all be freed from any thread.
_ALL_BUFFERS: weakref.WeakSet[_ThreadBuffers] = weakref.WeakSet()
_ALL_BUFFERS_LOCK = threading.Lock()


def _stack(centers: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """All restarts' means as one (n_init*k, d) matrix in X's dtype, and their squared norms."""
    stacked = np.ascontiguousarray(centers.reshape(-1, centers.shape[-1]), dtype=dtype)
    return stacked, row_sq_norms(stacked)


def _pass(
    X: np.ndarray | ColumnChunk,
    centers: np.ndarray,
    xsq: np.ndarray | None,
    w: np.ndarray | None,
    labels: np.ndarray,
    d1: np.ndarray,
    previous: np.ndarray | None = None,
    count_in_place: bool = False,
    checksum: bool = True,
    n_far: int = 0,
) -> tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, int | None,
    tuple[np.ndarray, np.ndarray] | None,
]:  # fmt: skip
    """One compiled pass over X: writes the labels and clamped best squared distances per
    restart and row into ``labels`` and ``d1`` (each of shape (n_init, n)), and returns the
    weighted sums, counts and loss, the changed labels, the weighted sum of the squared row
    norms (``xsq``; computed in the pass when None), a checksum of X's bytes (None unless
    asked for and X is C-contiguous), and the ``n_far`` farthest rows the pass found, for
    ``_farthest`` (None when ``n_far`` is 0 or not less than the rows).

    Changed labels are counted against ``previous`` means, or, with ``count_in_place``,
    against the labels ``labels`` holds on entry; otherwise they are zero. Against
    ``previous``, a row keeps its label for certain when its margin to the second-nearest mean
    is larger than the distance the means moved (triangle inequality); only the other rows get
    their previous label computed. Near convergence that is a handful of rows, so the count is
    exact at almost no cost.
    """
    d = X.shape[1]
    n_init, k, _ = centers.shape
    stacked, cn = _stack(centers, X.dtype)
    sums = np.zeros((n_init, k, d), dtype=np.float64)
    counts = np.zeros((n_init, k), dtype=np.float64)
    loss = np.zeros(n_init, dtype=np.float64)
    changed = np.zeros(n_init, dtype=np.int64)
    sq_total = np.zeros(1, dtype=np.float64)
    if previous is None:
        P2, pn, eps = np.empty((0, d), dtype=X.dtype), _NONE, 0.0
        pmax, shift, smax = _NONE, np.empty((0, k)), _NONE
    else:
        shift = np.sqrt(((centers - previous) ** 2).sum(axis=-1))  # (n_init, k)
        # rounding of a compared value: d fused multiply-adds, ||mu||^2 cast to X's dtype and
        # added (two more), with room to spare
        eps = float(np.finfo(X.dtype).eps * (d + 6))
        prev_stacked, pn = _stack(previous, X.dtype)
        P2 = prev_stacked * X.dtype.type(-2)
        pmax = pn.reshape(n_init, k).max(axis=1)
        smax = shift.max(axis=1)
    tile = _tile_rows(n_init * k, d, X.dtype.itemsize)
    columns = isinstance(X, ColumnChunk)
    if columns and xsq is not None:
        raise ValueError("a ColumnChunk is read for one pass: pass remember=False and no xsq.")
    contiguous = checksum and not columns and X.flags.c_contiguous and X.size > 0
    word = np.uint64 if (d * X.dtype.itemsize) % 8 == 0 else np.uint32
    words = X.reshape(-1).view(word) if contiguous else np.empty(0, dtype=np.uint32)
    # the farthest rows are picked by a heap as the pass goes (a second pass over the
    # distances took 5% of the pass); with m >= n every row is one of them
    m = n_far if 0 < n_far < X.shape[0] else 0
    top = np.empty((n_init, m))
    top_index = np.empty((n_init, m), dtype=np.int64)
    top_size = np.zeros(n_init, dtype=np.int64)
    top_out = np.full(n_init, -np.inf)
    if columns:
        X.source.bad[0] = -1
    h = _fused_pass(
        X.source if columns else X, words, stacked * X.dtype.type(-2), cn,
        _NONE if xsq is None else np.ascontiguousarray(xsq, dtype=np.float64),
        _NONE if w is None else w, k, tile, labels, d1, sums, counts, loss, sq_total,
        P2, pn, eps, pmax, shift, smax, changed, count_in_place,
        top, top_index, top_size, top_out,
    )  # fmt: skip
    if columns:
        X.raise_if_non_finite()
    fingerprint = int(h) if contiguous else None
    found = None
    if m:
        # unique: full, no NaN, and every row left out strictly nearer than the heap's least
        unique = (top_size == m) & (top_out < top[:, 0]) & ~np.isnan(top).any(axis=1)
        found = unique, top_index
    return sums, counts, loss, changed, float(sq_total[0]), fingerprint, found


def thread_buffer(purpose: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array of the calling thread, reused from call to call:
    valid until the same thread asks again for the same ``purpose``.

    A fresh chunk-sized array costs more to fault in than a pass takes to fill it where
    malloc returns every large block to the OS when it is freed, as in Dask's workers
    (``MALLOC_TRIM_THRESHOLD_`` set): one 1.25M x 32 chunk's pass took 0.13 s there against
    0.08 s with its buffers reused. Each thread keeps, per purpose, the largest buffer it has
    been asked for.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    mine = getattr(_THREAD, "buffers", None)
    if mine is None:
        mine = _THREAD.buffers = _ThreadBuffers()
        with _ALL_BUFFERS_LOCK:
            _ALL_BUFFERS.add(mine)
    buf = mine.by_purpose.get(purpose)
    if buf is None or buf.size < nbytes:
        mine.by_purpose[purpose] = buf = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def release_thread_buffers() -> None:
    """Free every thread's :func:`thread_buffer` buffers (made again when next asked for), so
    that a process that has finished its passes goes back to its baseline: a long-lived
    worker would otherwise keep up to a chunk per thread. An array handed out before stays
    valid while its caller holds it."""
    with _ALL_BUFFERS_LOCK:
        every = list(_ALL_BUFFERS)
    for buffers in every:
        buffers.by_purpose.clear()


def chunk_stats(
    X: np.ndarray | ColumnChunk,
    centers: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    xsq: np.ndarray | None = None,
    previous: np.ndarray | None = None,
    offset: int = 0,
    n_far: int = 0,
    remember: bool = True,
) -> ChunkStats:
    """Statistics of one chunk for ``n_init`` sets of means.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32 or float64, or ColumnChunk
        The rows; a ``ColumnChunk`` is read in place, once (``remember=False``, no ``xsq``),
        and raises ``NonFiniteError`` if it holds NaN or an infinity.
    centers : ndarray of shape (n_init, k, d)
        The current means; cast to X's dtype for the matrix product.
    weights : ndarray of shape (n,), optional
        Sample weights; 1 for every row when omitted.
    xsq : ndarray of shape (n,), optional
        The squared row norms (``row_sq_norms``), kept between iterations when X is cached;
        otherwise the pass computes them.
    previous : ndarray like ``centers``, optional
        The previous iteration's means, to count changed labels.
    offset : int
        Global index of the chunk's first row.
    n_far : int
        How many of the rows farthest from their mean to return per restart.
    remember : bool
        Keep X's labels to count changed labels at the next pass over the same array (see
        ``_LabelMemo``). False for an array that will not be passed again (a chunk read for
        this pass only): no checksum of its bytes is taken and nothing is kept.
    """
    if isinstance(X, ColumnChunk) and remember:
        raise ValueError("a ColumnChunk is read for one pass: pass remember=False and no xsq.")
    n = X.shape[0]
    w = None if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    centers = np.asarray(centers)
    d1 = thread_buffer("distances", (centers.shape[0], n), np.float64)
    if previous is not None:
        previous = np.asarray(previous)
    remembered = None if previous is None or not remember else _LABELS.take(X, previous)
    if remembered is None:
        shape = (centers.shape[0], n)
        # kept by the memo, or used for this pass only
        labels = np.empty(shape, np.int32) if remember else thread_buffer("labels", shape, np.int32)
        sums, counts, loss, changed, sq_total, fingerprint, top = _pass(
            X, centers, xsq, w, labels, d1, previous, checksum=remember, n_far=n_far
        )
    else:
        before, labels = remembered
        sums, counts, loss, changed, sq_total, fingerprint, top = _pass(
            X, centers, xsq, w, labels, d1, count_in_place=True, n_far=n_far
        )
        if fingerprint != before:
            # X was modified in place since its labels were remembered: count the other way
            sums, counts, loss, changed, sq_total, fingerprint, top = _pass(
                X, centers, xsq, w, labels, d1, previous, n_far=n_far
            )
    if remember:
        _LABELS.put(X, fingerprint, centers, labels)
    if previous is None:
        changed = np.full(centers.shape[0], -1, dtype=np.int64)
    far_dist, far_rows, far_index = _farthest(X, d1, w, offset, n_far, top)
    return ChunkStats(sums, counts, loss, changed, far_dist, far_rows, far_index, n, sq_total)


class _LabelMemo:
    """The labels of the last pass over each live array, to count changed labels exactly
    without recomputing the previous labels.

    A fit evaluates its means on the same (persisted) chunk arrays pass after pass, and each
    pass's ``previous`` means are the means the pass before evaluated: their labels for those
    rows were computed then. They are kept per array object (weakly: forgotten with the
    array), with a checksum of its contents and the exact means they belong to. A pass takes
    them out, overwrites them with its own labels while counting the differences, and puts
    them back, so no chunk-sized array is allocated per pass; a pass that finds anything
    different (another array, other means), or a checksum that differs after its pass
    (modified rows), falls back to the bound-and-recompute path, which gives the same count.
    The cost is 4 bytes per row and restart while the array lives; arrays whose labels would
    take more than an eighth of their own size (few features, many restarts) are not
    remembered.
    """

    def __init__(self) -> None:
        # re-entrant: a weakref callback may run (garbage collection) while the lock is held
        self._lock = threading.RLock()
        self._entries: dict[int, tuple[weakref.ref, int, list[bytes], np.ndarray]] = {}

    def _forget(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    @staticmethod
    def _key(means: np.ndarray) -> bytes:
        return np.ascontiguousarray(means, dtype=np.float64).tobytes()

    def put(self, X: np.ndarray, fingerprint: int | None, centers: np.ndarray,
            labels: np.ndarray) -> None:  # fmt: skip
        if fingerprint is None or labels.nbytes * 8 > X.nbytes:
            return  # not worth more than an eighth of the rows' own memory
        key = id(X)
        try:
            ref = weakref.ref(X, lambda r, key=key: self._forget(key, r))
        except TypeError:
            return
        with self._lock:
            self._entries[key] = (ref, fingerprint, [self._key(c) for c in centers], labels)

    def take(self, X: np.ndarray, previous: np.ndarray) -> tuple[int, np.ndarray] | None:
        """Remove X's entry and return the checksum X had and its labels under each restart of
        ``previous``, as one (n_init, n) array the caller may overwrite; None unless all are
        remembered. The caller compares the checksum with X's current one."""
        with self._lock:
            entry = self._entries.pop(id(X), None)
        if entry is None or entry[0]() is not X:
            return None
        _, fingerprint, keys, labels = entry
        row_of = {key: r for r, key in enumerate(keys)}
        rows = [row_of.get(self._key(p)) for p in previous]
        if labels.shape[1] != len(X) or any(r is None for r in rows):
            return None
        if rows == list(range(len(keys))):
            return fingerprint, labels
        return fingerprint, labels[rows]


_LABELS = _LabelMemo()


@numba.njit(nogil=True, cache=True)
def _push(heap, index, size, out, r, v, i):  # pragma: no cover
    """Put row ``i`` at distance ``v`` into restart ``r``'s bounded min-heap of the largest
    distances (``heap`` and ``index``, filled up to ``size[r]``), where it belongs: the heap
    is not full, or ``v`` is beyond its least, which then goes to ``out[r]``. With the rows
    left out of the heap also kept there (by the caller), ``out[r]`` is the largest distance
    not in the heap, so that in the end the heap's rows are the unique set of farthest rows
    exactly when it is full, holds no NaN and ``out[r] < heap[0]``."""
    m = heap.shape[0]
    n = size[r]
    if n < m:
        # sift up
        c = n
        size[r] = n + 1
        while c > 0:
            parent = (c - 1) // 2
            if not heap[parent] > v:
                break
            heap[c] = heap[parent]
            index[c] = index[parent]
            c = parent
        heap[c] = v
        index[c] = i
    else:
        out[r] = max(out[r], heap[0])
        # replace the smallest, sift down
        c = 0
        while True:
            child = 2 * c + 1
            if child >= m:
                break
            if child + 1 < m and heap[child + 1] < heap[child]:
                child += 1
            if not heap[child] < v:
                break
            heap[c] = heap[child]
            index[c] = index[child]
            c = child
        heap[c] = v
        index[c] = i


def _farthest(
    X: np.ndarray,
    dist: np.ndarray,
    w: np.ndarray | None,
    offset: int,
    m: int,
    top: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``m`` rows of positive weight (every row when ``w`` is None) farthest from their
    mean, per restart.

    ``top`` is what the pass's heaps found (see ``_push``): per restart, whether they hold
    the unique set of the m farthest rows, and those rows. When they do not (a tie at the
    cut-off, fewer rows), the rows are found by a partition of ``dist``, keeping the
    lowest-index rows among those tied at the cut-off.
    """
    n_init, n = dist.shape
    m = min(m, n)
    far_dist = np.empty((n_init, m))
    far_rows = np.empty((n_init, m, X.shape[1]))
    far_index = np.empty((n_init, m), dtype=np.int64)
    if m == 0:
        return far_dist, far_rows, far_index
    positive = None
    for r in range(n_init):
        if top is not None and top[0][r]:
            top_r = top[1][r]
            neg = -dist[r, top_r]  # minus the score of these rows
        else:
            # minus the score (the distance, -inf for rows of no weight), formed in one pass
            if w is None:
                neg_all = -dist[r]
            else:
                if positive is None:
                    positive = w > 0
                neg_all = np.where(positive, -dist[r], np.inf)
            if m < n:
                # all rows strictly beyond the cut-off, then the lowest-index rows tied at it
                cut = np.partition(neg_all, m - 1)[m - 1]
                above = np.flatnonzero(neg_all < cut)
                tied = np.flatnonzero(neg_all == cut)[: m - len(above)]
                top_r = np.concatenate([above, tied])
            else:
                top_r = np.arange(m)
            neg = neg_all[top_r]
        # order: farthest first, then lowest row index, so ties never depend on chunking
        order = np.lexsort((top_r, neg))
        top_r, neg = top_r[order], neg[order]
        far_dist[r], far_rows[r], far_index[r] = -neg, X[top_r], top_r + offset
    return far_dist, far_rows, far_index


def combine_stats(a: ChunkStats, b: ChunkStats) -> ChunkStats:
    """Add two chunks' statistics; keep the overall farthest rows. Order-independent except
    for float64 rounding, which a fixed reduction tree makes repeatable."""
    return with_farthest(add_stats(a, b), (a, b))


def add_stats(a: ChunkStats, b: ChunkStats) -> ChunkStats:
    """``combine_stats`` without the farthest rows (left empty): the additive part, whose
    rounding depends on the order of the additions."""
    changed = np.where((a.changed < 0) | (b.changed < 0), -1, a.changed + b.changed)
    n_init, d = a.sums.shape[0], a.sums.shape[2]
    return ChunkStats(
        sums=a.sums + b.sums,
        counts=a.counts + b.counts,
        loss=a.loss + b.loss,
        changed=changed,
        far_dist=np.empty((n_init, 0)),
        far_rows=np.empty((n_init, 0, d)),
        far_index=np.empty((n_init, 0), dtype=np.int64),
        n_rows=a.n_rows + b.n_rows,
        sq_total=a.sq_total + b.sq_total,
    )


def with_farthest(total: ChunkStats, parts: Sequence[ChunkStats]) -> ChunkStats:
    """``total`` with the farthest rows of all ``parts``: as many as the most any part has,
    farthest first, ties by lowest row index. A strict order, so selecting from all parts at
    once gives what selecting pair by pair, in any order, gives."""
    m = max(p.far_dist.shape[1] for p in parts)
    dist = np.concatenate([p.far_dist for p in parts], axis=1)
    index = np.concatenate([p.far_index for p in parts], axis=1)
    rows = np.concatenate([p.far_rows for p in parts], axis=1)
    order = np.lexsort((index, -dist), axis=1)[:, :m]
    take = np.take_along_axis
    return replace(
        total,
        far_dist=take(dist, order, axis=1),
        far_rows=take(rows, order[..., None], axis=1),
        far_index=take(index, order, axis=1),
    )


def assign_labels(
    X: np.ndarray | ColumnChunk, centers: np.ndarray, xsq: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest mean (int32) and squared distance to it (float64) for each row, for one set of
    means of shape (k, d); ``xsq``: the rows' squared norms, when already known (never for a
    ``ColumnChunk``, which raises ``NonFiniteError`` if it holds NaN or an infinity)."""
    labels = np.empty((1, X.shape[0]), dtype=np.int32)
    d1 = np.empty((1, X.shape[0]), dtype=np.float64)
    _pass(X, np.asarray(centers)[None], xsq, None, labels, d1, checksum=False)
    return labels[0], d1[0]
