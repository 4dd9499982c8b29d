"""Beam search and nucleus sampling on step functions whose distributions the test controls."""
import itertools
import math

import pytest
import torch

from pretrain.models.decoding import BeamSearch, NucleusSampling

SOS, EOS, A, B, C, D = 1, 2, 4, 5, 6, 7
VOCAB = 8


def table_step(table):
    """Step function: next-token probabilities looked up by the prefix (without [SOS])."""

    def step(prefixes):
        rows = []
        for prefix in prefixes.tolist():
            probs = torch.full((VOCAB,), 1e-9)
            for token, p in table.get(tuple(prefix[1:]), {EOS: 1.0}).items():
                probs[token] = p
            rows.append(probs.log())
        return torch.stack(rows)

    return step


# Greedy takes A (0.5) but every continuation of A is poor; B then EOS is the best caption.
TRAP = {
    (): {A: 0.5, B: 0.4, C: 0.1},
    (A,): {B: 0.26, C: 0.25, D: 0.25, EOS: 0.24},
    (B,): {EOS: 0.9, C: 0.1},
}


def score(table, caption):
    """Log-probability of ``caption`` (ending with EOS) under ``table``, banned tokens excluded."""
    total, prefix = 0.0, ()
    for token in caption:
        total += math.log(table.get(prefix, {EOS: 1.0}).get(token, 1e-9))
        prefix += (token,)
    return total


def brute_force_best(table, max_steps):
    candidates = []
    for length in range(1, max_steps + 1):
        for words in itertools.product((A, B, C, D), repeat=length - 1):
            if any(a == b for a, b in itertools.pairwise(words)):
                continue  # the decoders never repeat the previous token
            candidates.append(words + (EOS,))
    return max(candidates, key=lambda c: score(table, c))


def strip(row):
    return tuple(t for t in row.tolist() if t != 0)


def test_beam_search_beats_greedy_and_finds_the_best_caption():
    greedy = BeamSearch(SOS, EOS, beam_size=1, max_steps=4, banned_tokens=(0, SOS, 3))
    beam = BeamSearch(SOS, EOS, beam_size=3, max_steps=4, banned_tokens=(0, SOS, 3))
    greedy_caption = strip(greedy(table_step(TRAP), 1)[0])
    beam_caption = strip(beam(table_step(TRAP), 1)[0])
    assert greedy_caption[0] == A
    assert beam_caption == (B,)  # [EOS] and what follows it is blanked
    assert (B, EOS) == brute_force_best(TRAP, 4)
    assert score(TRAP, (B, EOS)) > score(TRAP, greedy_caption + (EOS,))
    _, scores = beam.search(table_step(TRAP), 1)
    assert scores[0, 0].item() == pytest.approx(score(TRAP, (B, EOS)), abs=1e-4)
    assert (scores[0, :-1] >= scores[0, 1:]).all()  # best first


def test_beam_search_respects_max_steps_and_batches_independently():
    endless = {(): {A: 0.9, EOS: 0.1}}
    for n in range(1, 10):
        endless[(A, B) * (n // 2) + (A,) * (n % 2)] = {B if n % 2 else A: 0.99, EOS: 0.01}
    beam = BeamSearch(SOS, EOS, beam_size=2, max_steps=5)
    sequences, _ = beam.search(table_step(endless), 2)
    assert sequences.shape == (2, 2, 5)
    best = beam(table_step(endless), 2)
    assert best.tolist() == [[A, B, A, B, A]] * 2  # never ended: cut at max_steps, no EOS


def test_beam_search_stops_when_all_beams_ended():
    calls = []

    def step(prefixes):
        calls.append(prefixes.size(1))
        return table_step(TRAP)(prefixes)

    BeamSearch(SOS, EOS, beam_size=2, max_steps=30)(step, 1)
    assert max(calls) <= 4


def test_decoders_never_emit_banned_or_repeated_tokens():
    favourite = {(): {0: 0.5, 3: 0.3, A: 0.2}, (A,): {A: 0.9, B: 0.1}, (A, B): {EOS: 1.0}}
    for decoder in (BeamSearch(SOS, EOS, beam_size=2, max_steps=5, banned_tokens=(0, SOS, 3)),
                    NucleusSampling(SOS, EOS, nucleus_size=0.5, max_steps=5, banned_tokens=(0, SOS, 3))):
        assert strip(decoder(table_step(favourite), 1)[0]) == (A, B)


def test_nucleus_probs_keep_exactly_the_smallest_set_reaching_p():
    sampler = NucleusSampling(SOS, EOS, nucleus_size=0.7)
    probs = torch.tensor([[0.05, 0.4, 0.05, 0.25, 0.15, 0.1, 0.0, 0.0]])
    kept = sampler.nucleus_probs(probs.log())
    assert (kept[0] > 0).nonzero().flatten().tolist() == [1, 3, 4]
    torch.testing.assert_close(kept[0, [1, 3, 4]], torch.tensor([0.4, 0.25, 0.15]) / 0.8)
    assert (sampler.nucleus_probs(torch.tensor([[0.0, -30.0]]))[0] == torch.tensor([1.0, 0.0])).all()


def test_nucleus_sampling_only_samples_from_the_nucleus_and_is_seeded():
    table = {(): {A: 0.5, B: 0.3, C: 0.15, D: 0.05}}
    sampler = NucleusSampling(SOS, EOS, nucleus_size=0.75, max_steps=3, seed=3)
    first = sampler(table_step(table), 400)[:, 0]
    assert set(first.tolist()) == {A, B}
    assert 0.5 < (first == A).float().mean() < 0.75  # renormalised: 0.5 / 0.8
    again = NucleusSampling(SOS, EOS, nucleus_size=0.75, max_steps=3, seed=3)(table_step(table), 400)[:, 0]
    assert torch.equal(first, again)
    other = NucleusSampling(SOS, EOS, nucleus_size=0.75, max_steps=3, seed=4)(table_step(table), 400)[:, 0]
    assert not torch.equal(first, other)


def test_nucleus_sampling_stops_at_eos_and_respects_max_steps():
    table = {(): {A: 0.5, EOS: 0.5}, (A,): {B: 1.0}, (A, B): {A: 1.0}, (A, B, A): {B: 1.0}}
    out = NucleusSampling(SOS, EOS, nucleus_size=1.0, max_steps=3, seed=0)(table_step(table), 64)
    assert out.shape[1] <= 3
    rows = {strip(row) for row in out}
    assert rows == {(), (A, B, A)}  # ended at once, or cut at 3 steps without EOS


def test_invalid_settings():
    with pytest.raises(ValueError):
        BeamSearch(SOS, EOS, beam_size=0)
    with pytest.raises(ValueError):
        NucleusSampling(SOS, EOS, nucleus_size=0.0)
