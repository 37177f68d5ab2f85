"""Fused token sampling: temperature, softmax, top-k / top-p filtering and the draw, no sort.

`sample(logits, temperature=..., top_k=..., top_p=..., seed=..., offset=...)` returns one
token per row of `logits` [B, V]. Two Triton paths, neither of which sorts: the row kernel
(one program per row) for large batches, and the split path (many programs per row) for
small ones, where one program per row would leave most SMs idle; `split_chunks(B, V)`
chooses (below). The row kernel loops over the vocabulary in blocks:

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

The split path cuts each row into chunks, one program per (row, chunk), in a few launches;
x below is logit * log2(e) / temperature in float32, the same in every phase:

1. stats: each chunk's max and smallest finite x. Without filters (or at temperature 0)
   this phase is the whole draw: each chunk's winner of the exponential race below;
2. rounds (`rounds`, default 2): every program of a row derives the same PIVOTS pivots
   from the earlier rounds' totals and adds its chunk's count (top-k) or fixed-point mass
   (top-p) of the x >= each pivot to the row's totals (integer atomics: exact and
   order-free, so the result never depends on which program came first). Round 1 spans
   the row (pivot 0 weighs all of it) and [max - R, max], R = log2(4V / (1 - top_p))
   for top-p (the x below hold less than (1 - top_p) / 4 of the mass, so the cutoff is
   inside) or 32 for top-k; each later round splits the bracket [lo, hi) around the
   cutoff PIVOTS-fold;
3. compaction: each chunk appends its x in the final [lo, hi) (top-k: every x >= lo)
   with their columns to the row's list (slots from an atomic add on its length), and
   for top-p runs the race among the x >= hi, which survive for sure;
4. finish, one program per row: the exact cutoff by a search on the float bits of the
   listed x (the same rule as the row kernel; top-k, then top-p among the top-k set when
   both), then the race among the listed survivors against the chunks' winners.

The draw is an exponential race (the Gumbel-max trick): each surviving token i gets
E_i ~ Exp(1) from a counter-based Philox stream, and the token with the largest
x_i - log2(E_i) (the first arrival p_i / E_i) wins, exactly a draw from the filtered
softmax; it needs only a max across chunks, and ties go to the first index.

Choosing: `split_chunks` sends batches up to SPLIT_MAX_BATCH rows over vocabularies of at
least SPLIT_MIN_VOCAB words to the split path, with chunks of a multiple of
SPLIT_MIN_CHUNK logits so that the batch makes about SPLIT_PROGRAMS programs (batch 1 over
128256 words: 251 chunks); everything else goes to the row kernel.

Randomness: Philox keyed by `seed`. The row kernel draws one uniform per row, counter
`offset * 2**20 + row`; the split path draws one per token, counter (token // 4, row,
offset's low and high 32 bits), lane token % 4. The same (seed, offset) gives the same
tokens on the same path (the path depends only on B and V, so a captured graph replays
the same one); a decoding loop advances `offset` by one per step. Both may be Python ints
(baked into a captured CUDA graph) or int64 tensors of one element on the logits' device,
read by the kernels at run time: a captured graph then advances them with an in-place
`offset += 1` captured alongside, and no host sync happens anywhere.

Memory: with top-k or top-p the launchers allocate scratch rows, B x V x 8 bytes (float32
values + int32 indices), so that the whole-row fallback (row kernel) or a list holding
the whole row (split path: a flat row, or a top-k cutoff below round 1's span) always fits.

`sample_reference` is the textbook torch version (softmax, topk, sort + cumsum for top-p,
torch.multinomial with a generator seeded from seed and offset). The two draw from the
same distribution, not the same tokens.
"""
from __future__ import annotations

import math
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

# The split path (see split_chunks): many programs share a row when the batch is small.
SPLIT_MAX_BATCH = 32  # more rows than this: one program per row already fills the GPU
SPLIT_MIN_VOCAB = 16384  # shorter rows: one program reads a row in a few blocks anyway
SPLIT_PROGRAMS = 256  # programs per pass the split aims at (about two per SM of an H100)
SPLIT_MIN_CHUNK = 512  # logits per program at the least
_SPLIT_TOPK_RANGE = 32.0  # base-2 units below the max that round 1's pivots span for top-k

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
# The split path: many programs per row (small batches)
# --------------------------------------------------------------------------------------
if _HAVE_TRITON:
    _NO_TOKEN = tl.constexpr(-(2**63 - 1))  # below every packed race entry
    _MASS_ONE = tl.constexpr(1099511627776.0)  # 2**40: the fixed-point mass of the row max

    @triton.jit
    def _order_key(x):
        """int32 with the order of the float32 x (-0.0 and +0.0 share the key 0)."""
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return tl.where(x == 0.0, 0, key)

    @triton.jit
    def _key_value(key):
        """The float32 whose _order_key is `key` (int32)."""
        bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _fixed_mass(x, m):
        """2^(x - m) in units of 2^-40 (int64): sums of these are exact, so their order,
        and which program adds them, never changes a cutoff."""
        return (tl.exp2(x - m) * _MASS_ONE).to(tl.int64)

    @triton.jit
    def _rng_key(seed_ptr, offset_ptr, seed_value, offset_value,
                 SEED_IN_TENSOR: tl.constexpr, OFFSET_IN_TENSOR: tl.constexpr):
        """(seed, low and high 32 bits of offset), read from the device tensors or the values."""
        if SEED_IN_TENSOR:
            seed = tl.load(seed_ptr)
        else:
            seed = seed_value
        if OFFSET_IN_TENSOR:
            offset = tl.load(offset_ptr).to(tl.int64)
        else:
            offset = tl.cast(offset_value, tl.int64)
        return seed, offset.to(tl.int32), (offset >> 32).to(tl.int32)

    @triton.jit
    def _exponential(bits):
        """E ~ Exp(1) from 32 random bits: E = -ln(1 - w), w uniform on a 2^-24 grid. Small w
        (small E, where rare tokens win the race) by its series, exact to float32 even where
        a fast log of a number near 1 is not; 1 - w is kept >= 2^-25 (float32 rounds the top
        of the grid to w = 1), so E stays finite and positive."""
        w = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        series = w * (1.0 + w * (0.5 + w * (0.33333334 + w * (0.25 + w * (0.2 + w * 0.16666667)))))
        return tl.where(w < 0.0625, series, -tl.log(tl.maximum(1.0 - w, 2.9802322e-08)))

    @triton.jit
    def _race_entry(x, cols, bits, RANDOM: tl.constexpr):
        """The exponential race, packed for a max: high 32 bits the order key of
        x - log2(E) with E ~ Exp(1) from the random `bits` (x itself when not RANDOM:
        greedy), low 32 bits 2^31 - 1 - col so that ties go to the first index. The argmax
        of x - log2(E) over a set draws from the softmax restricted to that set, exactly
        (p_i / E_i is the first arrival of a race with rates p_i)."""
        if RANDOM:
            y = x - tl.log2(_exponential(bits))
        else:
            y = x
        packed = (_order_key(y).to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)
        return tl.where(x > float("-inf"), packed, _NO_TOKEN)

    @triton.jit
    def _race_token(best):
        """The vocabulary index inside a packed race entry (0 where nothing entered)."""
        token = 2147483647 - (best - ((best >> 32) << 32))
        return tl.where(best == _NO_TOKEN, 0, token)

    @triton.jit
    def _load_block4(ptr, row_base, start, end, row_ok, x_scale, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """x [ROWS, BLOCK // 4, 4] of columns start + 4 g + lane (-inf at and past `end`),
        and those columns [BLOCK // 4, 4]: one Philox call gives the four lanes' random bits."""
        cols = start + 4 * tl.arange(0, BLOCK // 4)[:, None] + tl.arange(0, 4)[None, :]
        ok = row_ok[:, None, None] & (cols[None, :, :] < end)
        x = tl.load(ptr + row_base[:, None, None] + cols[None, :, :], mask=ok, other=float("-inf"))
        return x.to(tl.float32) * x_scale, cols

    @triton.jit
    def _race_bits4(seed, start, rows, off_lo, off_hi, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Random bits [ROWS, BLOCK // 4, 4] for the columns of _load_block4: Philox counter
        (column // 4, row, offset low, offset high), lane column % 4 of its four outputs."""
        zero = tl.zeros([ROWS, BLOCK // 4], tl.int32)
        group = zero + (start // 4 + tl.arange(0, BLOCK // 4))[None, :]
        r0, r1, r2, r3 = tl.philox(seed, group, zero + rows[:, None], zero + off_lo, zero + off_hi)
        lane = tl.arange(0, 4)[None, None, :]
        return tl.where(lane == 0, r0[:, :, None], tl.where(lane == 1, r1[:, :, None],
                        tl.where(lane == 2, r2[:, :, None], r3[:, :, None])))

    @triton.jit
    def _race_bits_at(seed, cols, rows, off_lo, off_hi):
        """The bits _race_bits4 gives column `cols` [ROWS, N] (any order) of each row."""
        zero = cols * 0
        r0, r1, r2, r3 = tl.philox(seed, cols >> 2, zero + rows[:, None], zero + off_lo, zero + off_hi)
        lane = cols & 3
        return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))

    @triton.jit
    def _split_max_min(stats_ptr, rows, row_ok, n_chunks, ROWS: tl.constexpr, CHUNKS: tl.constexpr):
        """Row max m (0 for a row of -inf) and smallest finite x, merged from the chunks' stats."""
        c = tl.arange(0, CHUNKS)[None, :]
        ok = row_ok[:, None] & (c < n_chunks)
        at = rows.to(tl.int64)[:, None] * (2 * n_chunks) + c
        m = tl.max(tl.load(stats_ptr + at, mask=ok, other=float("-inf")), axis=1)
        x_min = tl.min(tl.load(stats_ptr + at + n_chunks, mask=ok, other=float("inf")), axis=1)
        return tl.where(m == float("-inf"), 0.0, m), x_min

    @triton.jit
    def _split_first_pivots(m, x_min, range_below, PIVOTS: tl.constexpr):
        """Round 1: pivot 0 at or below every finite x (it counts and weighs the whole row),
        pivots 1.. evenly from m - range_below up to just below hi0 = the first bracket's top."""
        hi0 = m + 1.0 + tl.abs(m) * 1e-6  # strictly above m: nothing is >= hi0
        lo0 = m - range_below
        col = tl.arange(0, PIVOTS)[None, :]
        even = lo0[:, None] + (col - 1).to(tl.float32) * ((hi0 - lo0) / (PIVOTS - 1))[:, None]
        return tl.where(col == 0, tl.minimum(x_min, lo0)[:, None], even), hi0

    @triton.jit
    def _split_bracket(piv_ptr, cnt_ptr, mass_ptr, rows, row_ok, hi0, goal_k, top_p,
                       DONE: tl.constexpr, ROUNDS: tl.constexpr, BY_MASS: tl.constexpr,
                       ROWS: tl.constexpr, PIVOTS: tl.constexpr):
        """Replays the first DONE rounds from their pivots and totals: the bracket [lo, hi)
        around the cutoff with key(x >= lo) >= goal > key(x >= hi), key the count (top-k,
        goal top_k) or the fixed-point mass (top-p, goal top_p * the row's whole mass, which
        round 1's pivot 0 weighs). Returns lo, hi, c_lo, c_hi, s_lo, s_hi (counts and
        masses of x >= lo and x >= hi) and the goal. When even pivot 0 misses the goal
        (fewer finite logits than top_k) every finite logit survives: lo = hi = pivot 0."""
        col = tl.arange(0, PIVOTS)[None, :]
        lo = hi0
        hi = hi0
        c_lo = tl.zeros([ROWS], tl.int32)
        c_hi = tl.zeros([ROWS], tl.int32)
        s_lo = tl.zeros([ROWS], tl.int64)
        s_hi = tl.zeros([ROWS], tl.int64)
        goal = tl.zeros([ROWS], tl.int64) + goal_k
        for r in tl.static_range(DONE):
            at = (rows.to(tl.int64) * ROUNDS + r)[:, None] * PIVOTS + col
            piv = tl.load(piv_ptr + at, mask=row_ok[:, None], other=0.0)
            cnt = tl.load(cnt_ptr + at, mask=row_ok[:, None], other=0)
            mass = tl.load(mass_ptr + at, mask=row_ok[:, None], other=0)
            if BY_MASS:
                if r == 0:
                    whole = tl.sum(tl.where(col == 0, mass, 0), axis=1)
                    goal = tl.ceil(whole.to(tl.float64) * top_p).to(tl.int64)
                key = mass
            else:
                key = cnt.to(tl.int64)
            # key falls with the pivot: the last pivot still meeting the goal is the new lo.
            j_met = tl.sum((key >= goal[:, None]).to(tl.int32), axis=1) - 1
            j = tl.maximum(j_met, 0)
            at_lo = col == j[:, None]
            at_hi = col == j[:, None] + 1  # no column when j is the last pivot: hi stays
            has_next = j + 1 < PIVOTS
            missed = j_met < 0
            new_lo = tl.sum(tl.where(at_lo, piv, 0.0), axis=1)
            new_c_lo = tl.sum(tl.where(at_lo, cnt, 0), axis=1)
            new_s_lo = tl.sum(tl.where(at_lo, mass, 0), axis=1)
            hi = tl.where(missed, new_lo, tl.where(has_next, tl.sum(tl.where(at_hi, piv, 0.0), axis=1), hi))
            c_hi = tl.where(missed, new_c_lo, tl.where(has_next, tl.sum(tl.where(at_hi, cnt, 0), axis=1), c_hi))
            s_hi = tl.where(missed, new_s_lo, tl.where(has_next, tl.sum(tl.where(at_hi, mass, 0), axis=1), s_hi))
            lo = new_lo
            c_lo = new_c_lo
            s_lo = new_s_lo
        return lo, hi, c_lo, c_hi, s_lo, s_hi, goal

    @triton.jit
    def _split_stats_kernel(
        logits_ptr, stats_ptr, part_ptr, cnt_ptr, mass_ptr, list_n_ptr, seed_ptr, offset_ptr,
        B, V, stride_row, chunk, n_chunks, seed_value, offset_value, x_scale,
        RACE_ONLY: tl.constexpr, RANDOM: tl.constexpr,
        SEED_IN_TENSOR: tl.constexpr, OFFSET_IN_TENSOR: tl.constexpr,
        ROUNDS: tl.constexpr, PIVOTS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Phase 1, program (row group, chunk). RACE_ONLY (no filter, or greedy): the chunk's
        race winner to part[row, chunk]. Else the chunk's max and smallest finite x to
        stats[row, 0 / 1, chunk], and chunk 0 zeroes the row's round totals and list length."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.program_id(1)
        row_ok = rows < B
        row_base = rows.to(tl.int64) * stride_row
        first = c * chunk
        end = tl.minimum(first + chunk, V)
        if RACE_ONLY:
            seed, off_lo, off_hi = _rng_key(seed_ptr, offset_ptr, seed_value, offset_value,
                                            SEED_IN_TENSOR, OFFSET_IN_TENSOR)
            best = tl.full([ROWS], _NO_TOKEN, tl.int64)
            for start in range(first, end, BLOCK):
                x, cols = _load_block4(logits_ptr, row_base, start, end, row_ok, x_scale, ROWS, BLOCK)
                if RANDOM:
                    bits = _race_bits4(seed, start, rows, off_lo, off_hi, ROWS, BLOCK)
                else:
                    bits = cols
                entry = _race_entry(x, cols[None, :, :], bits, RANDOM)
                best = tl.maximum(best, tl.max(tl.max(entry, axis=2), axis=1))
            tl.store(part_ptr + rows.to(tl.int64) * n_chunks + c, best, mask=row_ok)
        else:
            m = tl.full([ROWS], float("-inf"), tl.float32)
            x_min = tl.full([ROWS], float("inf"), tl.float32)
            n = tl.zeros([ROWS], tl.int32) + end
            for start in range(first, end, BLOCK):
                x = _load_block(logits_ptr, row_base, start + tl.arange(0, BLOCK), n, row_ok, x_scale)
                m = tl.maximum(m, tl.max(x, axis=1))
                x_min = tl.minimum(x_min, tl.min(tl.where(x > float("-inf"), x, float("inf")), axis=1))
            at = rows.to(tl.int64) * (2 * n_chunks) + c
            tl.store(stats_ptr + at, m, mask=row_ok)
            tl.store(stats_ptr + at + n_chunks, x_min, mask=row_ok)
            if c == 0:  # the later phases add into these with atomics
                col = tl.arange(0, PIVOTS)[None, :]
                for r in tl.static_range(ROUNDS):
                    at_r = (rows.to(tl.int64) * ROUNDS + r)[:, None] * PIVOTS + col
                    tl.store(cnt_ptr + at_r, tl.zeros([ROWS, PIVOTS], tl.int32), mask=row_ok[:, None])
                    tl.store(mass_ptr + at_r, tl.zeros([ROWS, PIVOTS], tl.int64), mask=row_ok[:, None])
                tl.store(list_n_ptr + rows, tl.zeros([ROWS], tl.int32), mask=row_ok)

    @triton.jit
    def _split_round_kernel(
        logits_ptr, stats_ptr, piv_ptr, cnt_ptr, mass_ptr,
        B, V, stride_row, chunk, n_chunks, x_scale, range_below, goal_k, top_p,
        DONE: tl.constexpr, ROUNDS: tl.constexpr, BY_MASS: tl.constexpr,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr, CHUNKS: tl.constexpr,
    ):
        """Phase 2, round DONE + 1, program (row group, chunk): every program of a row derives
        the same pivots (round 1: _split_first_pivots; later: PIVOTS evenly over the bracket
        the earlier rounds left), chunk 0 stores them, and each adds its chunk's count (and
        with BY_MASS fixed-point mass) of the x >= each pivot to the row's totals."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.program_id(1)
        row_ok = rows < B
        row_base = rows.to(tl.int64) * stride_row
        m, x_min = _split_max_min(stats_ptr, rows, row_ok, n_chunks, ROWS, CHUNKS)
        first_piv, hi0 = _split_first_pivots(m, x_min, range_below, PIVOTS)
        col = tl.arange(0, PIVOTS)[None, :]
        if DONE == 0:
            piv = first_piv
        else:
            lo, hi, c_lo, c_hi, s_lo, s_hi, goal = _split_bracket(piv_ptr, cnt_ptr, mass_ptr, rows, row_ok, hi0,
                                                                  goal_k, top_p, DONE, ROUNDS, BY_MASS, ROWS, PIVOTS)
            piv = lo[:, None] + (hi - lo)[:, None] * (col.to(tl.float32) / PIVOTS)
        at = (rows.to(tl.int64) * ROUNDS + DONE)[:, None] * PIVOTS + col
        if c == 0:
            tl.store(piv_ptr + at, piv, mask=row_ok[:, None])
        counts = tl.zeros([ROWS, PIVOTS], tl.int32)
        masses = tl.zeros([ROWS, PIVOTS], tl.int64)
        first = c * chunk
        end = tl.minimum(first + chunk, V)
        n = tl.zeros([ROWS], tl.int32) + end
        for start in range(first, end, BLOCK):
            x = _load_block(logits_ptr, row_base, start + tl.arange(0, BLOCK), n, row_ok, x_scale)
            above = x[:, :, None] >= piv[:, None, :]  # [ROWS, BLOCK, PIVOTS]
            counts += tl.sum(above.to(tl.int32), axis=1)
            if BY_MASS:
                e = _fixed_mass(x, m[:, None])
                masses += tl.sum(tl.where(above, e[:, :, None], 0), axis=1)
        tl.atomic_add(cnt_ptr + at, counts, mask=row_ok[:, None])
        if BY_MASS:
            tl.atomic_add(mass_ptr + at, masses, mask=row_ok[:, None])

    @triton.jit
    def _split_compact_kernel(
        logits_ptr, stats_ptr, piv_ptr, cnt_ptr, mass_ptr, list_n_ptr, list_val_ptr, list_idx_ptr, part_ptr,
        seed_ptr, offset_ptr,
        B, V, stride_row, chunk, n_chunks, x_scale, range_below, goal_k, top_p, seed_value, offset_value,
        ALL_ABOVE: tl.constexpr, BY_MASS: tl.constexpr,
        SEED_IN_TENSOR: tl.constexpr, OFFSET_IN_TENSOR: tl.constexpr,
        ROUNDS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr, CHUNKS: tl.constexpr,
    ):
        """Phase 3, program (row group, chunk): appends the chunk's x in the final bracket
        [lo, hi) (with ALL_ABOVE, every x >= lo) with their columns to the row's list, at
        slots reserved by an atomic add on its length; without ALL_ABOVE also runs the race
        among the x >= hi (sure survivors) and stores the winner to part[row, chunk]."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.program_id(1)
        row_ok = rows < B
        row_base = rows.to(tl.int64) * stride_row
        m, x_min = _split_max_min(stats_ptr, rows, row_ok, n_chunks, ROWS, CHUNKS)
        first_piv, hi0 = _split_first_pivots(m, x_min, range_below, PIVOTS)
        lo, hi, c_lo, c_hi, s_lo, s_hi, goal = _split_bracket(piv_ptr, cnt_ptr, mass_ptr, rows, row_ok, hi0,
                                                              goal_k, top_p, ROUNDS, ROUNDS, BY_MASS, ROWS, PIVOTS)
        seed, off_lo, off_hi = _rng_key(seed_ptr, offset_ptr, seed_value, offset_value,
                                        SEED_IN_TENSOR, OFFSET_IN_TENSOR)
        list_base = rows.to(tl.int64) * V
        best = tl.full([ROWS], _NO_TOKEN, tl.int64)
        first = c * chunk
        end = tl.minimum(first + chunk, V)
        for start in range(first, end, BLOCK):
            x, cols = _load_block4(logits_ptr, row_base, start, end, row_ok, x_scale, ROWS, BLOCK)
            keep = x >= lo[:, None, None]
            if not ALL_ABOVE:
                above = x >= hi[:, None, None]
                keep = keep & (x < hi[:, None, None])
                bits = _race_bits4(seed, start, rows, off_lo, off_hi, ROWS, BLOCK)
                entry = tl.where(above, _race_entry(x, cols[None, :, :], bits, True), _NO_TOKEN)
                best = tl.maximum(best, tl.max(tl.max(entry, axis=2), axis=1))
            # Slots: the groups' exclusive prefix plus the lanes' inclusive prefix (any
            # bijection onto the reserved range would do: the finish does not depend on order).
            k = keep.to(tl.int32)
            per_group = tl.sum(k, axis=2)
            slot = (tl.cumsum(per_group, axis=1) - per_group)[:, :, None] + tl.cumsum(k, axis=2) - 1
            taken = tl.sum(per_group, axis=1)
            base = tl.atomic_add(list_n_ptr + rows, taken, mask=row_ok & (taken > 0))
            dest = (list_base + base)[:, None, None] + slot
            tl.store(list_val_ptr + dest, x, mask=keep)
            tl.store(list_idx_ptr + dest, cols[None, :, :] + slot * 0, mask=keep)
        if not ALL_ABOVE:
            tl.store(part_ptr + rows.to(tl.int64) * n_chunks + c, best, mask=row_ok)

    @triton.jit
    def _list_mass(val_ptr, base, n, row_ok, m, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Fixed-point mass of a row's whole list."""
        total = tl.zeros([ROWS], tl.int64)
        for start in range(0, tl.max(n, axis=0), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = row_ok[:, None] & (cols[None, :] < n[:, None])
            x = tl.load(val_ptr + base[:, None] + cols[None, :], mask=ok, other=float("-inf"))
            total += tl.sum(_fixed_mass(x, m[:, None]), axis=1)
        return total

    @triton.jit
    def _key_search(val_ptr, base, n, row_ok, m, klo, khi, c_lo, c_hi, s_lo, s_hi, c_base, s_base, goal,
                    BY_MASS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    PIVOTS: tl.constexpr, MAX_ROUNDS: tl.constexpr):
        """The exact cutoff among a row's list: shrinks the bracket [klo, khi) of int64
        order keys, PIVOTS-fold a round, keeping key(x >= klo) >= goal > key(x >= khi)
        (key: count, or with BY_MASS fixed-point mass, of the list's x above plus c_base /
        s_base for what lies above the list). Integer keys make it exact in at most
        32 / log2(PIVOTS) rounds; it stops once the bracket holds at most one x (or, for a
        count, exactly goal x lie above klo). Returns klo, c_lo, s_lo."""
        col = tl.arange(0, PIVOTS)[None, :]
        active = row_ok & (c_lo - c_hi > 1) & (khi - klo > 1)
        if not BY_MASS:
            active = active & (c_lo.to(tl.int64) != goal)
        rounds = 0
        while (tl.max(active.to(tl.int32), axis=0) > 0) & (rounds < MAX_ROUNDS):
            piv = klo[:, None] + ((khi - klo)[:, None] * col) // PIVOTS
            counts = tl.zeros([ROWS, PIVOTS], tl.int32) + c_base[:, None]
            masses = tl.zeros([ROWS, PIVOTS], tl.int64) + s_base[:, None]
            for start in range(0, tl.max(n, axis=0), BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = row_ok[:, None] & (cols[None, :] < n[:, None])
                x = tl.load(val_ptr + base[:, None] + cols[None, :], mask=ok, other=float("-inf"))
                above = _order_key(x).to(tl.int64)[:, :, None] >= piv[:, None, :]
                counts += tl.sum(above.to(tl.int32), axis=1)
                e = _fixed_mass(x, m[:, None])
                masses += tl.sum(tl.where(above, e[:, :, None], 0), axis=1)
            if BY_MASS:
                key = masses
            else:
                key = counts.to(tl.int64)
            j_met = tl.sum((key >= goal[:, None]).to(tl.int32), axis=1) - 1
            j = tl.maximum(j_met, 0)
            at_lo = col == j[:, None]
            at_hi = col == j[:, None] + 1
            has_next = j + 1 < PIVOTS
            new_lo = tl.sum(tl.where(at_lo, piv, 0), axis=1)
            new_hi = tl.where(has_next, tl.sum(tl.where(at_hi, piv, 0), axis=1), khi)
            ok_round = active & (j_met >= 0)  # a miss (rounding between phases): keep the bracket
            klo = tl.where(ok_round, new_lo, klo)
            khi = tl.where(ok_round, new_hi, khi)
            c_lo = tl.where(ok_round, tl.sum(tl.where(at_lo, counts, 0), axis=1), c_lo)
            c_hi = tl.where(ok_round, tl.where(has_next, tl.sum(tl.where(at_hi, counts, 0), axis=1), c_hi), c_hi)
            s_lo = tl.where(ok_round, tl.sum(tl.where(at_lo, masses, 0), axis=1), s_lo)
            s_hi = tl.where(ok_round, tl.where(has_next, tl.sum(tl.where(at_hi, masses, 0), axis=1), s_hi), s_hi)
            active = ok_round & (c_lo - c_hi > 1) & (khi - klo > 1)
            if not BY_MASS:
                active = active & (c_lo.to(tl.int64) != goal)
            rounds += 1
        return klo, c_lo, s_lo

    @triton.jit
    def _split_finish_kernel(
        stats_ptr, piv_ptr, cnt_ptr, mass_ptr, list_n_ptr, list_val_ptr, list_idx_ptr, part_ptr,
        out_ptr, cutoff_ptr, seed_ptr, offset_ptr,
        B, V, n_chunks, range_below, goal_k, top_p, seed_value, offset_value,
        RACE_ONLY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, BY_MASS: tl.constexpr,
        SEED_IN_TENSOR: tl.constexpr, OFFSET_IN_TENSOR: tl.constexpr, WRITE_CUTOFF: tl.constexpr,
        ROUNDS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr,
        KEY_PIVOTS: tl.constexpr, KEY_ROUNDS: tl.constexpr, CHUNKS: tl.constexpr,
    ):
        """Phase 4, one program per row group. RACE_ONLY: the best of the chunks' winners.
        Else: the exact cutoff from the list (top-k, then top-p among the top-k when both),
        the race among the list's survivors against the chunks' winners above hi, and the
        token. WRITE_CUTOFF (tests) also stores the cutoff: the survivors are the x >= it."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < B
        c = tl.arange(0, CHUNKS)[None, :]
        parts = part_ptr + rows.to(tl.int64)[:, None] * n_chunks + c
        part_ok = row_ok[:, None] & (c < n_chunks)
        if RACE_ONLY:
            best = tl.max(tl.load(parts, mask=part_ok, other=_NO_TOKEN), axis=1)
        else:
            m, x_min = _split_max_min(stats_ptr, rows, row_ok, n_chunks, ROWS, CHUNKS)
            first_piv, hi0 = _split_first_pivots(m, x_min, range_below, PIVOTS)
            lo, hi, c_lo, c_hi, s_lo, s_hi, goal = _split_bracket(piv_ptr, cnt_ptr, mass_ptr, rows, row_ok, hi0,
                                                                  goal_k, top_p, ROUNDS, ROUNDS, BY_MASS, ROWS, PIVOTS)
            n = tl.load(list_n_ptr + rows, mask=row_ok, other=0)
            base = rows.to(tl.int64) * V
            klo = _order_key(lo).to(tl.int64)
            khi = _order_key(hi).to(tl.int64)
            zero32 = tl.zeros([ROWS], tl.int32)
            zero64 = tl.zeros([ROWS], tl.int64)
            if TOP_K:  # the list holds every x >= lo: counts over it are the row's counts
                if TOP_P:
                    s_all = _list_mass(list_val_ptr, base, n, row_ok, m, ROWS, BLOCK)
                else:
                    s_all = zero64
                klo, c_lo, s_lo = _key_search(list_val_ptr, base, n, row_ok, m, klo, khi, n, c_hi, s_all, zero64,
                                              zero32, zero64, goal, False, ROWS, BLOCK, KEY_PIVOTS, KEY_ROUNDS)
                if TOP_P:  # top_p of the renormalized top-k distribution
                    goal_p = tl.ceil(s_lo.to(tl.float64) * top_p).to(tl.int64)
                    klo, c_lo, s_lo = _key_search(list_val_ptr, base, n, row_ok, m, klo,
                                                  _order_key(hi0).to(tl.int64), c_lo, zero32, s_lo, zero64,
                                                  zero32, zero64, goal_p, True, ROWS, BLOCK, KEY_PIVOTS, KEY_ROUNDS)
                best = tl.full([ROWS], _NO_TOKEN, tl.int64)
            else:  # the list holds the x in [lo, hi); the x >= hi were raced in phase 3
                klo, c_lo, s_lo = _key_search(list_val_ptr, base, n, row_ok, m, klo, khi, c_lo, c_hi, s_lo, s_hi,
                                              c_hi, s_hi, goal, True, ROWS, BLOCK, KEY_PIVOTS, KEY_ROUNDS)
                best = tl.max(tl.load(parts, mask=part_ok, other=_NO_TOKEN), axis=1)
            seed, off_lo, off_hi = _rng_key(seed_ptr, offset_ptr, seed_value, offset_value,
                                            SEED_IN_TENSOR, OFFSET_IN_TENSOR)
            for start in range(0, tl.max(n, axis=0), BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = row_ok[:, None] & (cols[None, :] < n[:, None])
                x = tl.load(list_val_ptr + base[:, None] + cols[None, :], mask=ok, other=float("-inf"))
                idx = tl.load(list_idx_ptr + base[:, None] + cols[None, :], mask=ok, other=0)
                bits = _race_bits_at(seed, idx, rows, off_lo, off_hi)
                survives = ok & (_order_key(x).to(tl.int64) >= klo[:, None])
                entry = tl.where(survives, _race_entry(x, idx, bits, True), _NO_TOKEN)
                best = tl.maximum(best, tl.max(entry, axis=1))
            if WRITE_CUTOFF:
                tl.store(cutoff_ptr + rows, _key_value(klo.to(tl.int32)), mask=row_ok)
        token = tl.minimum(tl.maximum(_race_token(best), 0), V - 1)
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
    chunks: Optional[int] = None,
    rounds: int = 2,
    split_pivots: int = 32,
    cutoffs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused sampling kernel(s); returns `out`, LongTensor[B] (allocated when not
    given). Tuning knobs are for tests and benchmarks; left out, defaults fit a GPU (one
    row per program, or the split path for small batches: see split_chunks) or the
    interpreter. chunks: programs per row (1: the one-program-per-row kernel; None: the
    split_chunks heuristic). rounds / split_pivots: the split path's distributed pivot
    rounds and pivots per round. cutoffs (tests): a float32 [B] tensor where the split
    path with top-k or top-p writes each row's cutoff in its base-2 units (a token
    survives when logit * log2(e) / temperature, in float32, is >= it)."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    on_gpu = logits.device.type == "cuda"
    # The interpreter runs programs one after another and pays per op, not per element:
    # there, one program takes many rows at once.
    rows = rows_per_program or (1 if on_gpu else min(triton.next_power_of_2(B), 2048))
    use_k = top_k is not None and 0 < top_k < V
    use_p = top_p is not None and top_p < 1.0
    greedy = temperature == 0
    if out is None:
        out = torch.empty(B, dtype=torch.long, device=logits.device)
    chunks = split_chunks(B, V) if chunks is None else int(chunks)
    if chunks > 1:
        return _sample_split(
            logits, out, chunks, temperature=temperature, top_k=int(top_k) if use_k and not greedy else 0,
            top_p=float(top_p) if use_p and not greedy else 1.0, seed=seed, offset=offset, rows=rows,
            block=block or (512 if on_gpu else 16), search_block=search_block or (128 if on_gpu else 16),
            rounds=rounds, pivots=split_pivots, num_warps=num_warps or 4, cutoffs=cutoffs)
    block = block or (2048 if on_gpu else 64)
    search_block = search_block or (512 if on_gpu else 32)  # interpreter: rows x block x pivots <= 2**20
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


def split_chunks(batch: int, vocab: int) -> int:
    """Programs per row for a [batch, vocab] call: 1 (the one-program-per-row kernel) when
    batch > SPLIT_MAX_BATCH or vocab < SPLIT_MIN_VOCAB; else the split path with about
    SPLIT_PROGRAMS programs per pass over the batch, each chunk of at least
    SPLIT_MIN_CHUNK logits (batch 1 over 128256 words: 251 chunks of 512; batch 16: 16)."""
    if batch > SPLIT_MAX_BATCH or vocab < SPLIT_MIN_VOCAB:
        return 1
    per_row = max(2, SPLIT_PROGRAMS // max(batch, 1))
    size = -(-(-(-vocab // per_row)) // SPLIT_MIN_CHUNK) * SPLIT_MIN_CHUNK  # rounded up to SPLIT_MIN_CHUNK
    return max(2, -(-vocab // size))


def _sample_split(logits, out, chunks, *, temperature, top_k, top_p, seed, offset, rows, block, search_block,
                  rounds, pivots, num_warps, cutoffs):
    """The split path: phase 1 (stats, or the whole race without filters), `rounds` pivot
    rounds, the compaction and the finish; see the module docstring. top_k 0 / top_p 1: off."""
    B, V = logits.shape
    if rounds < 1 or pivots < 2 or pivots & (pivots - 1) or block % 4 or block & (block - 1):
        raise ValueError(f"sample: the split path needs rounds >= 1, a power-of-two split_pivots >= 2 and "
                         f"block (a power of two, >= 4); got rounds={rounds}, split_pivots={pivots}, block={block}")
    chunk = -(-triton.cdiv(V, chunks) // 4) * 4  # a multiple of 4: random bits come four to a Philox call
    n_chunks = triton.cdiv(V, chunk)
    block = min(block, triton.next_power_of_2(chunk))  # a chunk smaller than a block: no idle lanes
    search_block_chunk = min(search_block, triton.next_power_of_2(chunk))
    dev = logits.device
    greedy = temperature == 0
    race_only = greedy or (top_k == 0 and top_p >= 1.0)
    seed_t, seed_v = _as_seed(seed, "seed")
    offset_t, offset_v = _as_seed(offset, "offset")
    seed_arg = seed_t if seed_t is not None else out
    offset_arg = offset_t if offset_t is not None else out
    x_scale = _LOG2E / temperature if not greedy else 1.0
    grid = (triton.cdiv(B, rows), n_chunks)
    rng = dict(SEED_IN_TENSOR=seed_t is not None, OFFSET_IN_TENSOR=offset_t is not None)
    chunks_pow2 = triton.next_power_of_2(n_chunks)
    part = torch.empty((B, n_chunks), dtype=torch.int64, device=dev)
    if race_only:
        _split_stats_kernel[grid](
            logits, out, part, out, out, out, seed_arg, offset_arg,
            B, V, logits.stride(0), chunk, n_chunks, seed_v, offset_v, x_scale,
            RACE_ONLY=True, RANDOM=not greedy, **rng, ROUNDS=1, PIVOTS=2, ROWS=rows, BLOCK=block, num_warps=num_warps)
        _split_finish_kernel[(triton.cdiv(B, rows),)](
            out, out, out, out, out, out, out, part, out, out, seed_arg, offset_arg,
            B, V, n_chunks, 0.0, 0, 1.0, seed_v, offset_v,
            RACE_ONLY=True, TOP_K=False, TOP_P=False, BY_MASS=False, **rng, WRITE_CUTOFF=False,
            ROUNDS=1, ROWS=rows, BLOCK=search_block, PIVOTS=2, KEY_PIVOTS=2, KEY_ROUNDS=1, CHUNKS=chunks_pow2,
            num_warps=num_warps)
        return out
    use_k, use_p = top_k > 0, top_p < 1.0
    by_mass = use_p and not use_k  # top-k (alone or before top-p) is searched by count
    # Round 1's pivots span range_below base-2 units under the max. For top-p the span is
    # exact: the logits further down hold less than (1 - top_p) / 4 of the mass together.
    range_below = math.log2(4.0 * V / (1.0 - top_p)) if by_mass else _SPLIT_TOPK_RANGE
    stats = torch.empty((B, 2, n_chunks), dtype=torch.float32, device=dev)
    piv = torch.empty((B, rounds, pivots), dtype=torch.float32, device=dev)
    cnt = torch.empty((B, rounds, pivots), dtype=torch.int32, device=dev)
    mass = torch.empty((B, rounds, pivots), dtype=torch.int64, device=dev)
    list_n = torch.empty((B,), dtype=torch.int32, device=dev)
    list_val = torch.empty((B, V), dtype=torch.float32, device=dev)  # capacity V: every logit fits
    list_idx = torch.empty((B, V), dtype=torch.int32, device=dev)
    _split_stats_kernel[grid](
        logits, stats, part, cnt, mass, list_n, seed_arg, offset_arg,
        B, V, logits.stride(0), chunk, n_chunks, seed_v, offset_v, x_scale,
        RACE_ONLY=False, RANDOM=True, **rng, ROUNDS=rounds, PIVOTS=pivots, ROWS=rows, BLOCK=block,
        num_warps=num_warps)
    for done in range(rounds):
        _split_round_kernel[grid](
            logits, stats, piv, cnt, mass,
            B, V, logits.stride(0), chunk, n_chunks, x_scale, range_below, top_k, top_p,
            DONE=done, ROUNDS=rounds, BY_MASS=by_mass, ROWS=rows, BLOCK=search_block_chunk, PIVOTS=pivots,
            CHUNKS=chunks_pow2, num_warps=num_warps)
    _split_compact_kernel[grid](
        logits, stats, piv, cnt, mass, list_n, list_val, list_idx, part, seed_arg, offset_arg,
        B, V, logits.stride(0), chunk, n_chunks, x_scale, range_below, top_k, top_p, seed_v, offset_v,
        ALL_ABOVE=use_k, BY_MASS=by_mass, **rng, ROUNDS=rounds, ROWS=rows, BLOCK=block, PIVOTS=pivots,
        CHUNKS=chunks_pow2, num_warps=num_warps)
    _split_finish_kernel[(triton.cdiv(B, rows),)](
        stats, piv, cnt, mass, list_n, list_val, list_idx, part, out,
        cutoffs if cutoffs is not None else stats, seed_arg, offset_arg,
        B, V, n_chunks, range_below, top_k, top_p, seed_v, offset_v,
        RACE_ONLY=False, TOP_K=use_k, TOP_P=use_p, BY_MASS=by_mass, **rng, WRITE_CUTOFF=cutoffs is not None,
        ROUNDS=rounds, ROWS=rows, BLOCK=search_block, PIVOTS=pivots,
        KEY_PIVOTS=16, KEY_ROUNDS=9, CHUNKS=chunks_pow2, num_warps=num_warps)  # 16-fold: 8 rounds split 32-bit keys
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
