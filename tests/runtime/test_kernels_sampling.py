"""The fused sampling kernel, tested as a sampler: what it draws must follow the filtered
softmax distribution (a chi-square test over thousands of draws), never leave the top-k /
top-p set, repeat itself for the same seed and be the argmax at temperature 0.

Many draws come from one launch: a batch of thousands of rows, alternating between two
different rows of logits, so that the rows of one program (the interpreter packs many)
also check that each row keeps its own cutoffs.

The split path (many programs per row, for small batches) is forced with `chunks` on small
vocabularies, so that its phases really split each row; its filter set is compared exactly
with the reference through the cutoff it reports.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are defined (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from planlang.runtime.kernels import sampling as sampling_mod  # noqa: E402
from planlang.runtime.kernels.backend import triton_available  # noqa: E402
from planlang.runtime.kernels.sampling import filtered_probs_reference, sample, sample_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(DEVICE)[0], reason=triton_available(DEVICE)[1])
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

V = 40
DRAWS = 2000  # per row kind
P_MIN = 1e-3  # a correct sampler fails a test with this probability


def two_rows(seed=0, vocab=V):
    """Two peaked but not degenerate rows of logits (the top token holds 20-50%)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, vocab, generator=g) * 1.6


def batch_of(rows, draws=DRAWS):
    """[2 * draws, V]: the two rows alternating."""
    return rows.repeat(draws, 1)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of observed counts against probabilities (Pearson), pooling the categories
    expected fewer than 5 times into one. Tokens of probability 0 must have no count."""
    n = counts.sum().double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    if dof < 1:
        return 1.0
    # Chi-square survival function: the regularized upper incomplete gamma Q(dof/2, stat/2).
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def draw(logits, **kwargs):
    """The Triton launcher on the test device into a poisoned output."""
    logits = logits.to(DEVICE)
    out = torch.full((logits.shape[0],), -7, dtype=torch.long, device=DEVICE)
    sampling_mod.sample_triton(logits, out=out, **kwargs)
    assert ((out >= 0) & (out < logits.shape[1])).all(), "a row was left unwritten or out of range"
    return out.cpu()


def check_distribution(tokens, rows, **filters):
    """Each of the two row kinds: no excluded token, and the chi-square test passes."""
    for kind in range(2):
        probs = filtered_probs_reference(rows[kind:kind + 1].double(), **filters)[0]
        counts = torch.bincount(tokens[kind::2], minlength=rows.shape[1])
        assert counts[probs == 0].sum() == 0, f"row {kind}: drew tokens that the filters exclude"
        p = chi_square_p_value(counts, probs)
        assert p > P_MIN, f"row {kind}: frequencies do not follow the filtered softmax (p = {p:.2e})"


FILTERS = {
    "plain": {},
    "temperature": {"temperature": 0.6},
    "top_k": {"top_k": 7},
    "top_p": {"top_p": 0.75},
    "top_k_then_top_p": {"temperature": 1.3, "top_k": 12, "top_p": 0.6},
    "top_k_1": {"top_k": 1},
}


# ---------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("name", ["plain", "top_k", "top_p", "top_k_then_top_p"])
def test_reference_sampler_follows_the_filtered_distribution(name):
    rows = two_rows(seed=1)
    tokens = sample_reference(batch_of(rows), seed=11, **FILTERS[name])
    check_distribution(tokens, rows, **FILTERS[name])


def test_reference_top_p_keeps_the_token_that_crosses_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = filtered_probs_reference(logits, top_p=0.7)[0]
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))


# ---------------------------------------------------------------- the Triton kernel
@needs_triton
@pytest.mark.parametrize("name", list(FILTERS))
def test_kernel_follows_the_filtered_distribution(name):
    rows = two_rows(seed=2)
    tokens = draw(batch_of(rows), seed=5, offset=3, **FILTERS[name])
    check_distribution(tokens, rows, **FILTERS[name])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_reads_half_precision_logits(dtype):
    rows = two_rows(seed=3).to(dtype)
    filters = {"top_k": 9, "top_p": 0.8}
    tokens = draw(batch_of(rows), seed=6, **filters)
    check_distribution(tokens, rows.double(), **filters)


@needs_triton
@pytest.mark.parametrize("name", ["plain", "top_p", "top_k_then_top_p"])
def test_vocabulary_not_a_multiple_of_the_block_size(name):
    # 40 = 2 * 16 + 8: every pass spans three blocks (the online max / sum of exp rescales)
    # and its last block is partial.
    rows = two_rows(seed=4)
    tokens = draw(batch_of(rows), seed=7, block=16, search_block=16, **FILTERS[name])
    check_distribution(tokens, rows, **FILTERS[name])


@needs_triton
def test_top_k_on_a_row_whose_tail_defeats_the_gaussian_guess():
    # A tenth of the logits far below the rest inflates the standard deviation, so
    # mean + z * std lands above the row max: no logit passes the guess and the kernel
    # must fall back to copying the whole row.
    vocab, k = 600, 10
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(2, vocab, generator=g)
    rows[:, ::10] = -40.0
    x = rows[0] * 1.4426950408889634
    guess = x.mean() + sampling_mod._topk_z(k, vocab) * x.std(unbiased=False)
    assert (x >= guess).sum() < k, "the test row no longer exercises the fallback"
    tokens = draw(batch_of(rows, draws=1000), seed=8, top_k=k, block=256, search_block=64)
    check_distribution(tokens, rows, top_k=k)


@needs_triton
def test_ties_at_the_top_k_cutoff_all_survive():
    # Tokens 3, 17 and 29 tie for the 2nd place: top_k=2 keeps all three (and the max).
    row = torch.full((V,), -2.0)
    row[11] = 1.0
    row[[3, 17, 29]] = 0.5
    rows = torch.stack([row, row])
    tokens = draw(batch_of(rows, draws=1500), seed=9, top_k=2)
    assert set(tokens.tolist()) == {3, 11, 17, 29}
    check_distribution(tokens, rows, top_k=2)


@needs_triton
def test_minus_infinity_logits_are_never_drawn():
    rows = two_rows(seed=10)
    rows[:, ::3] = float("-inf")
    for filters in ({}, {"top_p": 0.95}, {"top_k": 30}):  # top_k above the 26 finite logits
        tokens = draw(batch_of(rows, draws=500), seed=10, **filters)
        assert (tokens % 3 != 0).all()


@needs_triton
def test_same_seed_and_offset_draw_the_same_tokens_and_a_new_offset_does_not():
    logits = batch_of(two_rows(seed=11), draws=500)
    first = draw(logits, seed=21, offset=4, top_p=0.9)
    assert torch.equal(first, draw(logits, seed=21, offset=4, top_p=0.9))
    assert not torch.equal(first, draw(logits, seed=21, offset=5, top_p=0.9))
    assert not torch.equal(first, draw(logits, seed=22, offset=4, top_p=0.9))


@needs_triton
def test_seed_and_offset_tensors_act_as_their_values():
    logits = batch_of(two_rows(seed=12), draws=300)
    seed = torch.tensor([21], device=DEVICE)
    for value in (4, 123_456):  # offset * 2**20 overflows 32 bits: the counter must be int64
        offset = torch.tensor([value], device=DEVICE)
        as_tensors = draw(logits, seed=seed, offset=offset, top_k=5)
        assert torch.equal(as_tensors, draw(logits, seed=21, offset=value, top_k=5))
    assert not torch.equal(as_tensors, draw(logits, seed=21, offset=123_456 + 2**12, top_k=5))


@needs_triton
def test_temperature_zero_is_the_argmax_first_index_among_ties():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(64, 200, generator=g)
    logits[5, [17, 150]] = 10.0  # a tie: the first index wins, as in torch.argmax
    tokens = draw(logits, temperature=0.0, top_k=3, block=64)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert tokens[5] == 17


# ---------------------------------------------------------------- the split path
SPLIT_V = 96
# The interpreter's cost grows with programs x blocks, not with rows: most tests split the
# row in three chunks of one block; the filter-set test and the long-list test run chunks
# of several blocks with a shorter last chunk.
SPLIT = {"chunks": 3, "block": 32, "search_block": 16}


def assorted_rows(vocab=300, seed=0):
    """Rows that stress the cutoffs: flat to peaked, many ties, one logit far above the rest
    (the top-k cutoff lies below round 1's pivots), a third of them -inf, three finite."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(vocab, generator=g) * scale for scale in (0.05, 0.5, 1.6, 4.0)]
    rows.append(torch.randn(vocab, generator=g).round())
    dominant = torch.randn(vocab, generator=g)
    dominant[17] = 40.0
    masked = torch.randn(vocab, generator=g) * 2
    masked[::3] = float("-inf")
    few = torch.full((vocab,), float("-inf"))
    few[[5, 50, 100]] = torch.tensor([1.0, 2.0, 0.5])
    return torch.stack(rows + [dominant, masked, few])


def survivors(logits, cutoffs, temperature=1.0):
    """The tokens the split path keeps: scaled logit (as the kernel computes it) >= the cutoff."""
    scale = torch.tensor(sampling_mod._LOG2E / temperature, dtype=torch.float32)
    return logits.float() * scale >= cutoffs[:, None]


def test_split_path_serves_small_batches_over_large_vocabularies():
    assert sampling_mod.split_chunks(1, 128256) == 251  # chunks of 512 logits
    assert sampling_mod.split_chunks(16, 128256) == 16
    assert sampling_mod.split_chunks(sampling_mod.SPLIT_MAX_BATCH + 1, 128256) == 1
    assert sampling_mod.split_chunks(1, sampling_mod.SPLIT_MIN_VOCAB - 1) == 1


@needs_triton
@pytest.mark.parametrize("name", list(FILTERS))
def test_split_path_follows_the_filtered_distribution(name):
    rows = two_rows(seed=2, vocab=SPLIT_V)
    tokens = draw(batch_of(rows), seed=5, offset=3, **SPLIT, **FILTERS[name])
    check_distribution(tokens, rows, **FILTERS[name])


EXACT_CASES = [({"top_k": 1}, 2), ({"top_k": 7}, 2), ({"top_k": 40, "temperature": 0.7}, 2), ({"top_p": 0.3}, 2),
               ({"top_p": 0.9}, 2), ({"top_p": 0.999, "temperature": 1.5}, 2), ({"top_k": 25, "top_p": 0.8}, 2),
               ({"top_k": 7}, 1), ({"top_p": 0.9}, 1), ({"top_k": 25, "top_p": 0.8}, 3), ({"top_p": 0.3}, 3)]


@needs_triton
@pytest.mark.parametrize("filters, rounds", EXACT_CASES, ids=[f"{f}-rounds{r}" for f, r in EXACT_CASES])
def test_split_path_keeps_exactly_the_reference_filter_set(filters, rounds):
    rows = assorted_rows()
    logits = rows.repeat(2, 1)  # one program of rows holds each kind twice
    cutoffs = torch.full((logits.shape[0],), float("nan"), device=DEVICE)
    # 4 chunks of 76 logits (the last of 72) in blocks of 32.
    tokens = draw(logits, seed=1, cutoffs=cutoffs, chunks=4, block=32, search_block=16, rounds=rounds, **filters)
    kept = survivors(logits, cutoffs.cpu(), filters.get("temperature", 1.0))
    expected = filtered_probs_reference(logits.double(), **filters) > 0
    for r in range(logits.shape[0]):
        assert torch.equal(kept[r], expected[r]), \
            f"row {r}: keeps {kept[r].sum()} tokens, the reference {expected[r].sum()}"
    assert kept[torch.arange(logits.shape[0]), tokens].all(), "drew a token outside the filter set"


@needs_triton
def test_split_path_with_a_long_candidate_list_follows_the_distribution():
    # Nearly flat rows: one coarse round leaves most of the row in the bracket, so the finish
    # searches a list many search blocks long.
    g = torch.Generator().manual_seed(20)
    rows = torch.randn(2, SPLIT_V, generator=g) * 0.3
    tokens = draw(batch_of(rows), seed=4, rounds=1, split_pivots=4, chunks=5, block=8, search_block=8, top_p=0.5)
    check_distribution(tokens, rows, top_p=0.5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_path_reads_half_precision_logits(dtype):
    rows = two_rows(seed=3, vocab=SPLIT_V).to(dtype)
    filters = {"top_k": 9, "top_p": 0.8}
    tokens = draw(batch_of(rows), seed=6, **SPLIT, **filters)
    check_distribution(tokens, rows.double(), **filters)


@needs_triton
def test_split_path_at_temperature_zero_is_the_argmax_first_index_among_ties():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(64, 200, generator=g)
    logits[5, [17, 150]] = 10.0  # a tie across chunks: the first index wins, as in torch.argmax
    logits[6, [40, 41]] = 10.0  # a tie inside one chunk
    tokens = draw(logits, temperature=0.0, top_k=3, chunks=6, block=16)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert tokens[5] == 17 and tokens[6] == 40


@needs_triton
def test_split_path_never_draws_minus_infinity_logits():
    rows = two_rows(seed=10, vocab=SPLIT_V)
    rows[:, ::3] = float("-inf")
    for filters in ({}, {"top_p": 0.95}, {"top_k": 70, "top_p": 0.9}):  # 64 finite logits
        tokens = draw(batch_of(rows, draws=200), seed=10, **SPLIT, **filters)
        assert (tokens % 3 != 0).all(), filters


@needs_triton
def test_split_path_same_seed_and_offset_draw_the_same_tokens_and_a_new_offset_does_not():
    logits = batch_of(two_rows(seed=11, vocab=SPLIT_V), draws=100)
    for filters in ({}, {"top_k": 20, "top_p": 0.9}):
        first = draw(logits, seed=21, offset=4, **SPLIT, **filters)
        assert torch.equal(first, draw(logits, seed=21, offset=4, **SPLIT, **filters))
        assert not torch.equal(first, draw(logits, seed=21, offset=5, **SPLIT, **filters))
        assert not torch.equal(first, draw(logits, seed=22, offset=4, **SPLIT, **filters))


@needs_triton
def test_split_path_seed_and_offset_tensors_act_as_their_values():
    logits = batch_of(two_rows(seed=12, vocab=SPLIT_V), draws=100)
    seed = torch.tensor([21], device=DEVICE)
    for value in (4, 2**33 + 7):  # past 32 bits: the offset's high word is in the counter
        offset = torch.tensor([value], device=DEVICE)
        as_tensors = draw(logits, seed=seed, offset=offset, top_p=0.9, **SPLIT)
        assert torch.equal(as_tensors, draw(logits, seed=21, offset=value, top_p=0.9, **SPLIT))
    assert not torch.equal(as_tensors, draw(logits, seed=21, offset=7, top_p=0.9, **SPLIT))


# ---------------------------------------------------------------- the public op
def test_public_op_samples_on_any_device_and_returns_longs():
    rows = two_rows(seed=14)
    logits = batch_of(rows, draws=1500).to(DEVICE)
    tokens = sample(logits, temperature=0.9, top_k=8, seed=torch.tensor([3], device=DEVICE), offset=1)
    assert tokens.dtype == torch.long and tokens.shape == (logits.shape[0],)
    check_distribution(tokens.cpu(), rows, temperature=0.9, top_k=8)


def test_custom_op_survives_torch_compile_without_graph_breaks():
    logits = batch_of(two_rows(seed=15), draws=8).to(DEVICE)
    seed = torch.tensor([7], device=DEVICE)

    def step(logits, seed):
        return sample(logits * 1.0, temperature=0.8, top_p=0.9, seed=seed, offset=2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits, seed), step(logits, seed))


def test_custom_op_passes_opcheck():
    logits = batch_of(two_rows(seed=16), draws=4).to(DEVICE)
    seed = torch.tensor([1], device=DEVICE)
    torch.library.opcheck(torch.ops.planlang.sample.default, (logits, 0.7, 5, 0.9, seed, 0, None, 3))


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"seed": torch.tensor([1.5])}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="sample"):
        sample(torch.randn(2, V), **kwargs)


# ---------------------------------------------------------------- real shapes on a GPU
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("filters", [{"top_k": 50}, {"top_p": 0.9}, {"top_k": 50, "top_p": 0.8}, {}])
def test_llama3_vocabulary_on_gpu_never_leaves_the_filtered_set(filters):
    vocab = 128256
    g = torch.Generator().manual_seed(17)
    row = torch.randn(vocab, generator=g) * 2.5  # a long, flat vocabulary with a few strong tokens
    row[torch.randperm(vocab, generator=g)[:20]] += 9.0
    rows = torch.stack([row, row.roll(1000)]).cuda()
    tokens = sample(batch_of(rows, draws=1000), temperature=0.9, seed=3, **filters).cpu()
    check_distribution(tokens, rows.cpu(), temperature=0.9, **filters)


def replays_with_a_device_offset(logits, replays: int, **filters):
    """One `sample` call captured in a CUDA graph that also advances its device offset: the
    tokens of `replays` replays, and of one more replay after the offset is set back to 0."""
    seed = torch.tensor([5], device="cuda")
    offset = torch.tensor([0], device="cuda")
    sample(logits, seed=seed, offset=offset, **filters)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample(logits, seed=seed, offset=offset, **filters)
        offset += 1
    seen = []
    for _ in range(replays):
        graph.replay()
        seen.append(tokens.clone())
    offset.fill_(0)
    graph.replay()
    return seen, tokens.clone()


@pytest.mark.gpu
@gpu
def test_sampling_replays_in_a_cuda_graph_with_a_device_offset():
    seen, again = replays_with_a_device_offset(batch_of(two_rows(seed=18), draws=8).cuda(), 3, top_k=5)
    assert torch.equal(again, seen[0])
    assert not torch.equal(seen[0], seen[1])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("filters", [{"top_k": 50}, {"top_p": 0.9}, {"top_k": 50, "top_p": 0.8}, {}])
def test_split_path_on_a_llama3_vocabulary_follows_the_filtered_distribution(filters):
    vocab = 128256
    g = torch.Generator().manual_seed(19)
    row = torch.randn(vocab, generator=g) * 2.5
    row[torch.randperm(vocab, generator=g)[:20]] += 9.0
    rows = torch.stack([row, row.roll(1000)]).cuda()
    assert sampling_mod.split_chunks(2, vocab) > 1
    offset = torch.zeros(1, dtype=torch.long, device="cuda")
    draws = []
    for _ in range(1000):  # batch 2 is the split path's case: many steps, not many rows
        draws.append(sample(rows, temperature=0.9, seed=3, offset=offset, **filters))
        offset += 1
    tokens = torch.stack(draws).reshape(-1).cpu()  # rows alternate, as batch_of lays them out
    check_distribution(tokens, rows.cpu(), temperature=0.9, **filters)


@pytest.mark.gpu
@gpu
def test_split_path_replays_in_a_cuda_graph_with_a_device_offset():
    g = torch.Generator().manual_seed(21)
    logits = (torch.randn(1, 128256, generator=g) * 2.5).cuda()
    seen, again = replays_with_a_device_offset(logits, 8, top_p=0.9)
    assert torch.equal(again, seen[0])
    assert len({int(t) for t in seen}) > 1
