"""Token sampling in one kernel: temperature, softmax, top-k / top-p filtering, the draw.

`sample(logits, temperature=..., top_k=..., top_p=..., seed=..., offset=...)` returns one
token per row of `logits` [B, V]. The Triton kernel runs one program per row and never
sorts; it loops over the vocabulary in blocks:

1. statistics: the row max and the sum of exp (the softmax normalizer), and for top-k the
   mean and standard deviation of the logits;
2. candidates: the logits that can possibly survive the filters are copied (value and
   index, in vocabulary order) to a per-row scratch row. For top-p the bound is exact: a
   logit below `max + log((1 - p) / 2 * Z / V)` cannot be in the top-p set, since all such
   tokens together hold less than (1 - p) / 2 of the mass. For top-k the bound is a guess
   from the Gaussian tail (mean + z * std, z from k / V with a safety margin); when fewer
   than k logits pass it, the whole row is copied instead, so the guess costs speed only;
3. thresholds: a search on the logit value over the candidates finds the top-k cutoff
   (the k-th largest logit), then the top-p cutoff inside the top-k set. Each round
   counts (and weighs) the candidates above PIVOTS evenly spaced pivots, shrinking the
   bracket [lo, hi) PIVOTS-fold; it stops as soon as the bracket isolates the cutoff;
4. the draw: inverse-CDF sampling among the survivors with one Philox uniform per row.

Filtering rule (ties): a token survives when its logit is >= the cutoff, so tokens tied
with the k-th largest logit (or with the token that crosses top_p) all survive; top-k may
then keep more than k tokens. Order: temperature, then top-k, then top-p on the
renormalized top-k distribution (as Hugging Face and vLLM do). temperature == 0 is greedy
(argmax, the first index among ties).

Randomness: Philox (tl.randint) keyed by `seed`, counter `offset * 2**20 + row`. The same
(seed, offset) gives the same tokens; a decoding loop advances `offset` by one per step.
Both may be Python ints (baked into a captured CUDA graph) or int64 tensors of one element
on the logits' device, read by the kernel at run time: a captured graph then advances
them with an in-place `offset += 1` captured alongside, and no host sync happens anywhere.

Memory: with top-k or top-p the launcher allocates the scratch rows, B x V x 8 bytes
(float32 values + int32 indices), so that the whole-row fallback always fits.

`sample_reference` is the textbook torch version (softmax, topk, sort + cumsum for top-p,
torch.multinomial with a generator seeded from seed and offset). The two draw from the
same distribution, not the same tokens.
"""
from __future__ import annotations

import statistics
from typing import Optional, Union

import torch

from planlang.runtime.kernels.backend import use_triton

try:  # the module must import without triton: the reference still works then
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # ImportError, or a broken install raising anything
    _HAVE_TRITON = False

_LOG2E = 1.4426950408889634
_ROW_BITS = 20  # Philox counter = offset * 2**20 + row: up to a million rows per call
_TOPK_MARGIN = 1.0  # standard deviations below the Gaussian estimate of the top-k cutoff

SeedLike = Union[int, torch.Tensor]


# --------------------------------------------------------------------------------------
# The reference: textbook torch
# --------------------------------------------------------------------------------------
def filtered_probs_reference(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """The distribution `sample` draws from, [B, V] in float32 (float64 for float64 input).

    Ties at a cutoff all survive, as in the kernel (see the module docstring).
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute) / temperature
    if top_k is not None and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(x, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # the token that crosses top_p is kept
        sorted_x = torch.gather(x, -1, order)
        cutoff = torch.where(drop_sorted, float("inf"), sorted_x).amin(dim=-1, keepdim=True)
        x = x.masked_fill(x < cutoff, float("-inf"))  # by value, so ties with the cutoff stay
    return torch.softmax(x, dim=-1)


def sample_reference(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: SeedLike = 0,
    offset: SeedLike = 0,
) -> torch.Tensor:
    """Textbook sampling: filtered softmax, then torch.multinomial seeded from (seed, offset).

    Reads tensor seeds with .item(): a host sync, acceptable only because this runs where
    Triton cannot (the CPU without the interpreter).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs_reference(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    generator = torch.Generator(device=logits.device)
    generator.manual_seed((int(seed) * 1_000_003 + int(offset)) % (2**63))
    return torch.multinomial(probs.float(), 1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------------------
# The Triton kernel
# --------------------------------------------------------------------------------------
if _HAVE_TRITON:

    @triton.jit
    def _load_block(ptr, row_base, cols, n, row_ok, x_scale):
        """[ROWS, BLOCK] values at `cols` of each row (row_base: int64 [ROWS]), times x_scale;
        -inf outside [0, n) (n: [ROWS]) and for rows past the batch."""
        ok = row_ok[:, None] & (cols[None, :] < n[:, None])
        x = tl.load(ptr + row_base[:, None] + cols[None, :], mask=ok, other=float("-inf"))
        return x.to(tl.float32) * x_scale

    @triton.jit
    def _greedy(logits_ptr, row_base, row_ok, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Index of the row max, the first one among ties (as torch.argmax)."""
        best = tl.full([ROWS], float("-inf"), tl.float32)
        best_idx = tl.zeros([ROWS], tl.int32)
        for start in range(0, tl.max(n, axis=0), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _load_block(logits_ptr, row_base, cols, n, row_ok, 1.0)
            block_max = tl.max(x, axis=1)
            block_idx = tl.argmax(x, axis=1) + start
            better = block_max > best  # strict: an earlier block wins a tie
            best_idx = tl.where(better, block_idx, best_idx)
            best = tl.where(better, block_max, best)
        return best_idx

    @triton.jit
    def _row_stats(logits_ptr, row_base, row_ok, n, x_scale,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, MOMENTS: tl.constexpr):
        """Row max m, Z = sum 2^(x - m) (x: base-2 logits), the smallest finite x, and with
        MOMENTS the mean and standard deviation of the finite x."""
        m = tl.full([ROWS], float("-inf"), tl.float32)
        z = tl.zeros([ROWS], tl.float32)
        x_min = tl.full([ROWS], float("inf"), tl.float32)
        s1 = tl.zeros([ROWS], tl.float32)
        s2 = tl.zeros([ROWS], tl.float32)
        finite = tl.zeros([ROWS], tl.float32)
        for start in range(0, tl.max(n, axis=0), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _load_block(logits_ptr, row_base, cols, n, row_ok, x_scale)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no NaN
            z = z * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
            m = m_new
            is_finite = x > float("-inf")
            x_min = tl.minimum(x_min, tl.min(tl.where(is_finite, x, float("inf")), axis=1))
            if MOMENTS:
                x0 = tl.where(is_finite, x, 0.0)
                s1 += tl.sum(x0, axis=1)
                s2 += tl.sum(x0 * x0, axis=1)
                finite += tl.sum(is_finite.to(tl.float32), axis=1)
        count = tl.maximum(finite, 1.0)
        mean = s1 / count
        std = tl.sqrt(tl.maximum(s2 / count - mean * mean, 0.0))
        return m, z, x_min, mean, std

    @triton.jit
    def _gather_candidates(logits_ptr, row_base, row_ok, n, x_scale, bound, take,
                           cand_val_ptr, cand_idx_ptr, cand_base,
                           ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Copy the x >= bound of the rows where `take` holds to the scratch rows, in
        vocabulary order; returns how many each row copied."""
        count = tl.zeros([ROWS], tl.int32)
        for start in range(0, tl.max(n, axis=0), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _load_block(logits_ptr, row_base, cols, n, row_ok, x_scale)
            keep = (x >= bound[:, None]) & take[:, None] & (cols[None, :] < n[:, None])
            slot = count[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
            dest = cand_base[:, None] + slot
            tl.store(cand_val_ptr + dest, x, mask=keep)
            tl.store(cand_idx_ptr + dest, cols[None, :] + slot * 0, mask=keep)
            count += tl.sum(keep.to(tl.int32), axis=1)
        return count

    @triton.jit
    def _pivot_round(cand_val_ptr, cand_base, n, row_ok, m, pivots,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr):
        """For pivots [ROWS, PIVOTS]: how many candidates are >= each, and their mass sum 2^(x - m)."""
        counts = tl.zeros([ROWS, PIVOTS], tl.int32)
        masses = tl.zeros([ROWS, PIVOTS], tl.float32)
        for start in range(0, tl.max(n, axis=0), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _load_block(cand_val_ptr, cand_base, cols, n, row_ok, 1.0)
            e = tl.exp2(x - m[:, None])
            above = x[:, :, None] >= pivots[:, None, :]  # [ROWS, BLOCK, PIVOTS]
            counts += tl.sum(above.to(tl.int32), axis=1)
            masses += tl.sum(tl.where(above, e[:, :, None], 0.0), axis=1)
        return counts, masses

    @triton.jit
    def _cutoff_search(cand_val_ptr, cand_base, n, row_ok, m, lo, hi, c_lo, c_hi, s_lo, goal, goal_frac,
                       BY_MASS: tl.constexpr, GOAL_FROM_LO: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr, MAX_ROUNDS: tl.constexpr):
        """Shrink the bracket [lo, hi) around the cutoff, keeping the invariant
        key(x >= lo) >= goal > key(x >= hi), where key is the count (top-k) or the mass
        (top-p) of the candidates above. c_lo / c_hi are the counts above lo / hi, s_lo the
        mass above lo. With GOAL_FROM_LO the goal is goal_frac * (mass above the first lo),
        learnt in the first round (top-p inside a top-k set). Stops when the bracket holds
        the cutoff alone (c_lo - c_hi <= 1, or for top-k c_lo == goal), or cannot shrink
        further (ties within float resolution)."""
        col = tl.arange(0, PIVOTS)[None, :]
        frac = col.to(tl.float32) / PIVOTS  # pivot 0 is lo itself
        active = row_ok & (c_lo - c_hi > 1)
        if not BY_MASS:
            active = active & (c_lo.to(tl.float32) != goal)
        rounds = 0
        while (tl.max(active.to(tl.int32), axis=0) > 0) & (rounds < MAX_ROUNDS):
            pivots = lo[:, None] + (hi - lo)[:, None] * frac
            counts, masses = _pivot_round(cand_val_ptr, cand_base, n, row_ok, m, pivots, ROWS, BLOCK, PIVOTS)
            if GOAL_FROM_LO:
                goal = tl.where(rounds == 0, goal_frac * tl.sum(tl.where(col == 0, masses, 0.0), axis=1), goal)
            if BY_MASS:
                key = masses
            else:
                key = counts.to(tl.float32)
            # key falls with the pivot: the last pivot still meeting the goal is the new lo.
            # None meeting it (fewer than k finite logits, or a mass rounding miss): lo stays.
            j_met = tl.sum((key >= goal[:, None]).to(tl.int32), axis=1) - 1
            j = tl.maximum(j_met, 0)
            at_lo = col == j[:, None]
            at_hi = col == j[:, None] + 1  # no column when j is the last pivot: hi stays
            has_next = j + 1 < PIVOTS
            new_lo = tl.sum(tl.where(at_lo, pivots, 0.0), axis=1)
            new_hi = tl.where(has_next, tl.sum(tl.where(at_hi, pivots, 0.0), axis=1), hi)
            new_c_lo = tl.sum(tl.where(at_lo, counts, 0), axis=1)
            new_c_hi = tl.where(has_next, tl.sum(tl.where(at_hi, counts, 0), axis=1), c_hi)
            new_s_lo = tl.sum(tl.where(at_lo, masses, 0.0), axis=1)
            moved = (new_lo != lo) | (new_hi != hi)
            lo = tl.where(active, new_lo, lo)
            hi = tl.where(active, new_hi, hi)
            c_lo = tl.where(active, new_c_lo, c_lo)
            c_hi = tl.where(active, new_c_hi, c_hi)
            s_lo = tl.where(active, new_s_lo, s_lo)
            active = active & moved & (j_met >= 0) & (c_lo - c_hi > 1)
            if not BY_MASS:
                active = active & (c_lo.to(tl.float32) != goal)
            rounds += 1
        return lo, c_lo, s_lo

    @triton.jit
    def _draw(val_ptr, val_base, idx_ptr, n, row_ok, x_scale, m, cutoff, total, u,
              FROM_CANDIDATES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Inverse-CDF draw among the x >= cutoff: the first position where the running mass
        reaches u * total. Returns the vocabulary index (through the scratch index row when
        FROM_CANDIDATES). If rounding leaves the target unreached, the last survivor wins."""
        target = u * total
        run = tl.zeros([ROWS], tl.float32)
        found = tl.zeros([ROWS], tl.int32) - 1
        last = tl.zeros([ROWS], tl.int32)
        for start in range(0, tl.max(n, axis=0), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _load_block(val_ptr, val_base, cols, n, row_ok, x_scale)
            e = tl.where(x >= cutoff[:, None], tl.exp2(x - m[:, None]), 0.0)
            block_mass = tl.sum(e, axis=1)
            crossing = (found < 0) & (run + block_mass >= target)
            block_last = tl.max(tl.where(e > 0.0, cols[None, :], -1), axis=1)
            if tl.max(crossing.to(tl.int32), axis=0) > 0:  # the scan runs in one block per row only
                reached = (run[:, None] + tl.cumsum(e, axis=1) >= target[:, None]) & (e > 0.0)
                first = tl.min(tl.where(reached, cols[None, :], 2147483647), axis=1)
                # The scan and the block sum round differently: a miss by a rounding error
                # at the end of the block takes the block's last survivor.
                found = tl.where(crossing, tl.where(first < 2147483647, first, block_last), found)
            last = tl.maximum(last, block_last)
            run += block_mass
        pos = tl.where(found >= 0, found, last)
        if FROM_CANDIDATES:
            return tl.load(idx_ptr + val_base + pos, mask=row_ok, other=0)
        return pos

    @triton.jit
    def _draw_total(cand_val_ptr, cand_base, n, row_ok, m, cutoff, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Mass sum 2^(x - m) of the candidates >= cutoff."""
        total = tl.zeros([ROWS], tl.float32)
        for start in range(0, tl.max(n, axis=0), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _load_block(cand_val_ptr, cand_base, cols, n, row_ok, 1.0)
            total += tl.sum(tl.where(x >= cutoff[:, None], tl.exp2(x - m[:, None]), 0.0), axis=1)
        return total

    @triton.jit
    def _sample_kernel(
        logits_ptr, out_ptr, cand_val_ptr, cand_idx_ptr, seed_ptr, offset_ptr,
        B, V, stride_row, seed_value, offset_value,
        x_scale, top_k, top_p, topk_z,
        GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
        SEED_IN_TENSOR: tl.constexpr, OFFSET_IN_TENSOR: tl.constexpr,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
        PIVOTS: tl.constexpr, MAX_ROUNDS: tl.constexpr,
    ):
        """ROWS rows per program (1 on a GPU; more under the interpreter, which runs programs
        one after another). Writes one int64 token per row."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < B
        row_base = rows.to(tl.int64) * stride_row
        n = tl.zeros([ROWS], tl.int32) + V

        if GREEDY:
            token = _greedy(logits_ptr, row_base, row_ok, n, ROWS, BLOCK)
        else:
            if SEED_IN_TENSOR:
                seed = tl.load(seed_ptr)
            else:
                seed = seed_value
            counter = rows.to(tl.int64)
            if OFFSET_IN_TENSOR:
                counter += tl.load(offset_ptr).to(tl.int64) * 1048576  # 1048576 = 2**_ROW_BITS
            else:
                # In int64 before the multiply; (an int arg equal to 1 arrives as a constexpr).
                counter += (tl.zeros([ROWS], tl.int64) + offset_value) * 1048576
            bits = tl.randint(seed, counter)
            u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # 24 bits, strictly inside (0, 1)

            m, z, x_min, mean, std = _row_stats(logits_ptr, row_base, row_ok, n, x_scale, ROWS, BLOCK, TOP_K)
            # Rows past the batch (the interpreter packs many rows) get harmless finite values.
            m = tl.where(row_ok, m, 0.0)
            z = tl.where(row_ok, z, 1.0)
            x_min = tl.where(row_ok, x_min, 0.0)
            if TOP_K or TOP_P:
                cand_base = rows.to(tl.int64) * V
                if TOP_K:
                    bound = tl.minimum(mean + topk_z * std, m)
                else:
                    # All logits below this bound together hold < (1 - top_p) / 2 of the mass.
                    bound = m + tl.log2((1.0 - top_p) * 0.5 * z / V)
                count = _gather_candidates(logits_ptr, row_base, row_ok, n, x_scale, bound, row_ok,
                                           cand_val_ptr, cand_idx_ptr, cand_base, ROWS, BLOCK)
                if TOP_K:
                    short = row_ok & (count < top_k)  # the Gaussian guess was too high: copy the whole row
                    if tl.max(short.to(tl.int32), axis=0) > 0:
                        every = tl.full([ROWS], float("-inf"), tl.float32)
                        recount = _gather_candidates(logits_ptr, row_base, row_ok, n, x_scale, every, short,
                                                     cand_val_ptr, cand_idx_ptr, cand_base, ROWS, BLOCK)
                        count = tl.where(short, recount, count)
                        bound = tl.where(short, x_min, bound)
                lo = tl.maximum(bound, x_min)
                hi = m + 1.0
                c_lo = tl.full([ROWS], 1 << 30, tl.int32)  # unknown until the first round counts it
                c_hi = tl.zeros([ROWS], tl.int32)
                s_lo = z
                if TOP_K:
                    goal_k = tl.zeros([ROWS], tl.float32) + top_k
                    lo, c_lo, s_lo = _cutoff_search(cand_val_ptr, cand_base, count, row_ok, m, lo, hi, c_lo, c_hi,
                                                    s_lo, goal_k, 0.0, False, False,
                                                    ROWS, SEARCH_BLOCK, PIVOTS, MAX_ROUNDS)
                if TOP_P:
                    goal_p = top_p * z  # without top-k: top_p of the whole distribution
                    lo, c_lo, s_lo = _cutoff_search(cand_val_ptr, cand_base, count, row_ok, m, lo, hi, c_lo, c_hi,
                                                    s_lo, goal_p, top_p, True, TOP_K,
                                                    ROWS, SEARCH_BLOCK, PIVOTS, MAX_ROUNDS)
                # The survivors' mass, summed the way _draw sums it (so u * total is reachable).
                survivors = _draw_total(cand_val_ptr, cand_base, count, row_ok, m, lo, ROWS, SEARCH_BLOCK)
                token = _draw(cand_val_ptr, cand_base, cand_idx_ptr, count, row_ok, 1.0, m, lo, survivors, u,
                              True, ROWS, SEARCH_BLOCK)
            else:
                no_cutoff = tl.full([ROWS], float("-inf"), tl.float32)
                token = _draw(logits_ptr, row_base, cand_idx_ptr, n, row_ok, x_scale, m, no_cutoff, z, u,
                              False, ROWS, BLOCK)
        tl.store(out_ptr + rows, token.to(tl.int64), mask=row_ok)

# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _topk_z(top_k: int, vocab: int) -> float:
    """Standard deviations above the mean where a Gaussian row would have about top_k
    logits, less a margin so that real (heavier-tailed or not) rows usually keep >= top_k."""
    tail = min(max(top_k / vocab, 1e-9), 0.5)
    return statistics.NormalDist().inv_cdf(1.0 - tail) - _TOPK_MARGIN


def _as_seed(value: SeedLike, what: str) -> tuple[Optional[torch.Tensor], int]:
    """(tensor, 0) for a one-element int tensor, (None, value) for a Python int."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point:
            raise ValueError(f"sample: {what} must be an int or a one-element integer tensor, got {value.dtype} {tuple(value.shape)}")
        return value.reshape(1), 0
    return None, int(value)


def sample_triton(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: SeedLike = 0,
    offset: SeedLike = 0,
    rows_per_program: Optional[int] = None,
    block: Optional[int] = None,
    search_block: Optional[int] = None,
    pivots: int = 8,
    num_warps: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused sampling kernel; returns `out`, LongTensor[B] (allocated when not
    given). Tuning knobs are for tests and benchmarks; left out, defaults fit a GPU (one
    row per program) or the interpreter."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    on_gpu = logits.device.type == "cuda"
    # The interpreter runs programs one after another and pays per op, not per element:
    # there, one program takes many rows at once.
    rows = rows_per_program or (1 if on_gpu else min(triton.next_power_of_2(B), 2048))
    block = block or (2048 if on_gpu else 64)
    search_block = search_block or (512 if on_gpu else 32)  # interpreter: rows x block x pivots <= 2**20
    use_k = top_k is not None and 0 < top_k < V
    use_p = top_p is not None and top_p < 1.0
    greedy = temperature == 0
    if out is None:
        out = torch.empty(B, dtype=torch.long, device=logits.device)
    if (use_k or use_p) and not greedy:
        # Scratch rows for the candidates; capacity V, so the whole-row fallback always fits.
        cand_val = torch.empty((B, V), dtype=torch.float32, device=logits.device)
        cand_idx = torch.empty((B, V), dtype=torch.int32, device=logits.device)
    else:
        cand_val = cand_idx = out  # never read
    seed_t, seed_v = _as_seed(seed, "seed")
    offset_t, offset_v = _as_seed(offset, "offset")
    _sample_kernel[(triton.cdiv(B, rows),)](
        logits, out, cand_val, cand_idx,
        seed_t if seed_t is not None else out, offset_t if offset_t is not None else out,
        B, V, logits.stride(0), seed_v, offset_v,
        _LOG2E / temperature if not greedy else 1.0,
        int(top_k) if use_k else 0, float(top_p) if use_p else 1.0,
        _topk_z(int(top_k), V) if use_k else 0.0,
        GREEDY=greedy, TOP_K=use_k and not greedy, TOP_P=use_p and not greedy,
        SEED_IN_TENSOR=seed_t is not None, OFFSET_IN_TENSOR=offset_t is not None,
        ROWS=rows, BLOCK=block, SEARCH_BLOCK=search_block, PIVOTS=pivots, MAX_ROUNDS=16,
        num_warps=num_warps or (8 if on_gpu else 1),
    )
    return out


# --------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------
def _check_args(logits, temperature, top_k, top_p):
    if logits.dim() != 2:
        raise ValueError(f"sample wants logits [B, V], got shape {tuple(logits.shape)}")
    if not temperature >= 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"sample: top_k must be >= 0 (0 or None: no top-k), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in (0, 1] (1 or None: no top-p), got {top_p}")


def _sample_impl(logits, temperature, top_k, top_p, seed, offset):
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=offset)
    if _HAVE_TRITON and use_triton(logits):
        return sample_triton(logits, **kwargs)
    return sample_reference(logits, **kwargs)


@torch.library.custom_op("planlang::sample", mutates_args=())
def _sample_op(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    seed: Optional[torch.Tensor],
    seed_value: int,
    offset: Optional[torch.Tensor],
    offset_value: int,
) -> torch.Tensor:
    return _sample_impl(logits, temperature, top_k, top_p,
                        seed if seed is not None else seed_value,
                        offset if offset is not None else offset_value)


@_sample_op.register_fake
def _sample_fake(logits, temperature, top_k, top_p, seed, seed_value, offset, offset_value):
    return logits.new_empty((logits.shape[0],), dtype=torch.long)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: SeedLike = 0,
    offset: SeedLike = 0,
) -> torch.Tensor:
    """One token per row of logits [B, V]: LongTensor[B] on the logits' device.

    temperature 0 is greedy. top_k None/0 and top_p None/1 disable those filters; ties at a
    cutoff all survive. seed/offset: Python ints, or one-element int64 tensors on the
    device that a captured CUDA graph can advance in place (advance offset by one per
    step). Runs the fused Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch
    reference elsewhere; goes through the custom op `torch.ops.planlang.sample`, so it
    survives torch.compile and CUDA-graph capture. Never syncs with the host.
    """
    _check_args(logits, temperature, top_k, top_p)
    seed_t, seed_v = _as_seed(seed, "seed")
    offset_t, offset_v = _as_seed(offset, "offset")
    return torch.ops.planlang.sample(
        logits, float(temperature), None if top_k is None else int(top_k),
        None if top_p is None else float(top_p), seed_t, seed_v, offset_t, offset_v,
    )
