"""Triton kernels of the batch-1 decode step (``lloco.model.fused``): a layer in five launches.

At batch 1 a decode step only streams weights; what costs beyond the bytes is the number of kernels (each
one a gap in the CUDA graph) and the small ones between the matmuls. These kernels fold that work into
the weight streams, and on Hopper each one fetches its first weight (or cache) tile before it waits for
the previous kernel (programmatic dependent launch), so consecutive kernels overlap:

- ``gemv``: ``out = W @ x`` for one row, with RMSNorm folded into the input (the norm's scale
  ``rsqrt(mean(x^2))`` factors out of the dot product, so its sum of squares runs in the same pass),
  optionally SiLU(gate) * up over the fused gate|up weight (a program's tile alternates gate and up
  rows), a residual added in place, a bias, and the multi-LoRA expand (``s @ B[slot]``) added last.
- ``lora_shrink``: ``s = x_hat @ A[slot].T`` for the row's slot (the small matmul the expand needs).
- ``decode_attention``: RoPE of the new query and key, the key/value written to the cache, and attention
  over the row's keys split into chunks across programs; the last program of a head to finish merges
  the chunks (a counter per head, reset by that program), so there is no second launch.

Under ``TRITON_INTERPRET=1`` they run on CPU tensors, which is how CI tests them.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

ATTENTION_BLOCK = 64  # keys per iteration of an attention program
MAX_SPLITS = 32  # attention programs per (row, KV head); their partial results are merged in registers
MAX_CHUNK = 1024  # keys per attention program past which a long cache gets more programs


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    norm_ptr,
    bias_ptr,
    out_ptr,
    s_ptr,
    lb_ptr,
    lb_stride,
    slot_ptr,
    n_out,
    k_in,
    n_lora,
    eps,
    NORM: tl.constexpr,
    GATED: tl.constexpr,
    RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LORA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PDL: tl.constexpr,
):
    tile = tl.arange(0, BLOCK_N)
    # gated: rows alternate gate row i and up row n_out + i, so a program holds both halves of its outputs
    if GATED:
        cols = tl.program_id(0) * (BLOCK_N // 2) + tile // 2
        col_ok = cols < n_out
        rows = cols + (tile % 2) * n_out
    else:
        rows = tl.program_id(0) * BLOCK_N + tile
        col_ok = rows < n_out
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None] * k_in
    # the weights do not depend on the previous kernel: fetch the first tile before waiting for it
    w_next = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & (kk < k_in)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + kk
        k_ok = k < k_in
        w = w_next
        k_ahead = k + BLOCK_K  # two tiles in flight per program
        w_next = tl.load(
            w_rows + k_ahead[None, :], mask=col_ok[:, None] & (k_ahead < k_in)[None, :], other=0.0
        )
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y / tl.sqrt(tl.sum(squares, axis=0) / k_in + eps)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=col_ok, other=0.0).to(tl.float32)
    if LORA:
        jj = tl.arange(0, BLOCK_J)
        slot = tl.load(slot_ptr)
        s = tl.load(s_ptr + jj, mask=jj < n_lora, other=0.0)
        lb_rows = (tl.maximum(slot, 0) * n_lora + jj) * lb_stride
        lb_mask = ((jj < n_lora) & (jj * 0 + slot >= 0))[:, None] & col_ok[None, :]
        lb = tl.load(lb_ptr + lb_rows[:, None] + rows[None, :], mask=lb_mask, other=0.0)
        y += tl.sum(s[:, None] * lb.to(tl.float32), axis=0)
    if GATED:
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        y = gate / (1.0 + tl.exp(-gate)) * up
        cols = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        col_ok = cols < n_out
    else:
        cols = rows
    if RESIDUAL:
        y += tl.load(out_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _lora_shrink_kernel(
    x_ptr, norm_ptr, a_ptr, slot_ptr, s_ptr, k_in, n_lora, eps,
    NORM: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0)
    slot = tl.load(slot_ptr)
    a_row = a_ptr + (tl.maximum(slot, 0) * n_lora + j) * k_in
    kk = tl.arange(0, BLOCK_K)
    slot_ok = kk * 0 + slot >= 0
    a_next = tl.load(a_row + kk, mask=slot_ok & (kk < k_in), other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + kk
        k_ok = k < k_in
        a = a_next
        a_next = tl.load(a_row + k + BLOCK_K, mask=slot_ok & (k + BLOCK_K < k_in), other=0.0)
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += a.to(tl.float32) * x
    s = tl.sum(acc, axis=0)
    if NORM:
        s = s / tl.sqrt(tl.sum(squares, axis=0) / k_in + eps)
    tl.store(s_ptr + j, s)


@triton.jit
def _decode_attention_kernel(
    qkv_ptr,
    qkv_stride,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    kc_ptr,
    vc_ptr,
    cache_sb,
    cache_sh,
    cache_sl,
    part_o_ptr,
    part_ml_ptr,
    count_ptr,
    out_ptr,
    out_stride,
    n_heads,
    n_kv_heads,
    splits,
    chunk,
    scale,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SPLITS_P: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row = pid // n_kv_heads
    head = pid % n_kv_heads
    pos = tl.load(pos_ptr + row)
    d = tl.arange(0, D)
    ll = tl.arange(0, BLOCK_L)
    k_cache = kc_ptr + row * cache_sb + head * cache_sh
    v_cache = vc_ptr + row * cache_sb + head * cache_sh
    # keys before the new one come from the cache, which this step's earlier kernels do not touch:
    # fetch the first block before waiting for the projections
    start = split * chunk
    end = tl.minimum(start + chunk, pos)
    first = start + ll
    k_next = tl.load(k_cache + first[:, None] * cache_sl + d[None, :], mask=(first < end)[:, None], other=0.0)
    v_next = tl.load(v_cache + first[:, None] * cache_sl + d[None, :], mask=(first < end)[:, None], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    d_rot = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * D + d)
    sin = tl.load(sin_ptr + pos * D + d)
    qkv = qkv_ptr + row * qkv_stride
    g = tl.arange(0, GP)
    g_ok = g < G
    q_cols = (head * G + g)[:, None] * D
    q = tl.load(qkv + q_cols + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    q_rot = tl.load(qkv + q_cols + d_rot[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    q = (q * cos[None, :] + q_rot * sign[None, :] * sin[None, :]) * scale
    q_dot = q.to(kc_ptr.dtype.element_ty)

    m = tl.full((GP,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, D), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_L):
        keys = l0 + ll
        k, v = k_next, v_next
        ahead = keys + BLOCK_L
        ahead_ok = (ahead < end)[:, None]
        k_next = tl.load(k_cache + ahead[:, None] * cache_sl + d[None, :], mask=ahead_ok, other=0.0)
        v_next = tl.load(v_cache + ahead[:, None] * cache_sl + d[None, :], mask=ahead_ok, other=0.0)
        scores = tl.dot(q_dot, tl.trans(k))
        scores = tl.where((keys < end)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    if (start <= pos) & (pos < start + chunk):  # this program's chunk holds the new key: write it, attend it
        k_cols = n_heads * D + head * D
        k_new = tl.load(qkv + k_cols + d).to(tl.float32)
        k_new_rot = tl.load(qkv + k_cols + d_rot).to(tl.float32)
        k_new = (k_new * cos + k_new_rot * sign * sin).to(kc_ptr.dtype.element_ty)
        v_new = tl.load(qkv + (n_heads + n_kv_heads) * D + head * D + d).to(vc_ptr.dtype.element_ty)
        tl.store(k_cache + pos * cache_sl + d, k_new)
        tl.store(v_cache + pos * cache_sl + d, v_new)
        score = tl.sum(q_dot.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1)
        m_new = tl.maximum(m, score)
        p = tl.exp(score - m_new)
        alpha = tl.exp(m - m_new)
        total = total * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m = m_new

    q_heads = row * n_heads + head * G + g
    tl.store(part_o_ptr + ((q_heads * splits + split) * D)[:, None] + d[None, :], acc, mask=g_ok[:, None])
    tl.store(part_ml_ptr + (q_heads * splits + split) * 2, m, mask=g_ok)
    tl.store(part_ml_ptr + (q_heads * splits + split) * 2 + 1, total, mask=g_ok)
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
    if arrived == splits - 1:  # the last program of this head merges the chunks
        ss = tl.arange(0, SPLITS_P)
        s_ok = ss < splits
        for gi in tl.static_range(G):
            part = (row * n_heads + head * G + gi) * splits + ss
            m_s = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0, cache_modifier=".cg")
            o_s = tl.load(
                part_o_ptr + (part * D)[:, None] + d[None, :],
                mask=s_ok[:, None],
                other=0.0,
                cache_modifier=".cg",
            )
            weight = tl.where(m_s > float("-inf"), tl.exp(m_s - tl.max(m_s, axis=0)), 0.0)
            merged = tl.sum(weight[:, None] * o_s, axis=0) / tl.sum(weight * l_s, axis=0)
            tl.store(
                out_ptr + row * out_stride + (head * G + gi) * D + d, merged.to(out_ptr.dtype.element_ty)
            )
        tl.atomic_xchg(count_ptr + pid, 0)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    return not _interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


def _launch_options(t: Tensor) -> dict:
    """Programmatic dependent launch on Hopper and later: a kernel starts while the previous one drains."""
    pdl = t.is_cuda and _pdl_supported(t.device)
    return dict(PDL=pdl, launch_pdl=True) if pdl else dict(PDL=False)


def gemv(
    x: Tensor,
    weight: Tensor,
    out: Tensor,
    *,
    residual: bool = False,
    norm: Tensor | None = None,
    eps: float = 0.0,
    gated: bool = False,
    bias: Tensor | None = None,
    lora: tuple[Tensor, Tensor, Tensor] | None = None,
    block: tuple[int, int, int] | None = None,
) -> None:
    """``W @ x`` for one row x [K] into ``out`` [N] (added to it when ``residual``).

    Args:
        weight: [N, K], or [2N, K] gate|up rows when ``gated`` (out = SiLU(gate) * up).
        norm: RMSNorm weight [K] applied to x first (with ``eps``).
        lora: (s [J] fp32 from ``lora_shrink``, B [S*J, rows of weight], slot [1] long): adds s @ B[slot].
        block: (BLOCK_N, BLOCK_K, num_warps); a per-shape default when None.
    """
    k_in = weight.shape[1]
    n_out = out.shape[-1]
    block_n, block_k, warps = block or default_block(weight.shape[0], k_in)
    s, lb, slot = lora if lora is not None else (x, weight, x)
    _gemv_kernel[(triton.cdiv(n_out, block_n // 2 if gated else block_n),)](
        x, weight, norm if norm is not None else weight, bias if bias is not None else weight, out,
        s, lb, lb.stride(0), slot, n_out, k_in, s.shape[-1] if lora is not None else 0, eps,
        NORM=norm is not None, GATED=gated, RESIDUAL=residual, HAS_BIAS=bias is not None,
        LORA=lora is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_J=_pow2(s.shape[-1]) if lora is not None else 1, num_warps=warps, **_launch_options(x),
    )  # fmt: skip


def default_block(n_rows: int, k_in: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of a weight stream: 4k-element tiles, measured best on an H200."""
    if _interpreting():
        # CPU tests: fewer, larger programs run faster in the interpreter (64 rows: a tiny model's step in
        # half the time of 16); the tests' matrices past 64 rows still take several programs, and odd sizes
        # a masked last one
        return 64, 128, 4
    return (8, 256, 4) if n_rows > 16384 else (4, 512, 4)


def lora_shrink(
    x: Tensor, a: Tensor, slot: Tensor, s: Tensor, *, norm: Tensor | None = None, eps: float = 0.0
) -> None:
    """s [J] (fp32) = x_hat [K] @ A[slot*J : (slot+1)*J].T; zeros when slot < 0 (x_hat: x RMS-normed by norm)."""
    k_in = a.shape[1]
    n_lora = s.shape[-1]
    _lora_shrink_kernel[(n_lora,)](
        x, norm if norm is not None else x, a, slot, s, k_in, n_lora, eps,
        NORM=norm is not None, BLOCK_K=min(1024, _pow2(k_in)), num_warps=4, **_launch_options(x),
    )  # fmt: skip


class AttentionWorkspace:
    """Partial results and per-head counters of ``decode_attention`` (counters must start at zero)."""

    def __init__(
        self, max_rows: int, n_heads: int, n_kv_heads: int, head_dim: int, device: torch.device
    ) -> None:
        self.part_o = torch.empty(
            max_rows * n_heads * MAX_SPLITS * head_dim, device=device, dtype=torch.float32
        )
        self.part_ml = torch.empty(max_rows * n_heads * MAX_SPLITS * 2, device=device, dtype=torch.float32)
        self.count = torch.zeros(max_rows * n_kv_heads, device=device, dtype=torch.int32)


def attention_split(rows: int, n_kv_heads: int, kv_len: int, programs: int) -> tuple[int, int]:
    """(chunk, splits): keys per program, a multiple of ``ATTENTION_BLOCK``: about ``programs`` programs for
    short caches, more for long ones (at most ``MAX_CHUNK`` keys each, up to ``MAX_SPLITS`` per head)."""
    per_head = min(MAX_SPLITS, max(-(-programs // (rows * n_kv_heads)), -(-kv_len // MAX_CHUNK)))
    chunk = -(-max(1, -(-kv_len // per_head)) // ATTENTION_BLOCK) * ATTENTION_BLOCK
    return chunk, -(-kv_len // chunk)


def decode_attention(
    qkv: Tensor,
    positions: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    workspace: AttentionWorkspace,
    n_heads: int,
    n_kv_heads: int,
    kv_len: int,
    programs: int,
) -> None:
    """One new token per row b (cache row b) at ``positions[b]``: RoPE, cache write, attention -> out [B, H*D].

    qkv [B, (H + 2*Hkv) * D] are the step's projections before RoPE; cos/sin [P, D] fp32 tables; caches
    [rows, Hkv, L, D]; keys [0, positions[b]] are attended (``kv_len`` > every position bounds the splits).
    """
    rows = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    group = n_heads // n_kv_heads
    chunk, splits = attention_split(rows, n_kv_heads, kv_len, programs)
    _decode_attention_kernel[(rows * n_kv_heads, splits)](
        qkv, qkv.stride(0), cos, sin, positions, k_cache, v_cache,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        workspace.part_o, workspace.part_ml, workspace.count, out, out.stride(0),
        n_heads, n_kv_heads, splits, chunk, head_dim**-0.5,
        G=group, GP=max(16, _pow2(group)), D=head_dim, BLOCK_L=ATTENTION_BLOCK, SPLITS_P=_pow2(splits),
        num_warps=4, **_launch_options(qkv),
    )  # fmt: skip
