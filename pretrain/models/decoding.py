"""Autoregressive caption decoding: beam search and nucleus (top-p) sampling.

Both decoders drive a *step function* ``step(prefixes) -> logits``: ``prefixes`` is an
(N, t) long tensor of token sequences that all start with [SOS] and have no padding, and the
result is the (N, V) next-token logits of each row. Row ``b * k + j`` of a beam search call
belongs to image ``b`` (so a model repeats its visual features with ``repeat_interleave``).

Both return an (B, L) long tensor of generated tokens without [SOS]; [EOS] and everything a
sequence produced after it are replaced by ``padding_index`` (0), so ``row[row != 0]`` is the
caption. Both follow the official VirTex decoders (v1.2+, full prefixes instead of the
AllenNLP back-pointer trick): scores are plain sums of log-probabilities (no length
normalisation), a sequence stops at [EOS], and the token generated at the previous step may
not be repeated immediately. In addition, ``banned_tokens`` (the model passes padding/<unk>,
[SOS] and [MASK]) are never generated, so an output id 0 always means "no token".
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.nn import functional as F

StepFunction = Callable[[torch.Tensor], torch.Tensor]


def _allowed_logprobs(
    logits: torch.Tensor, prefixes: torch.Tensor, banned_tokens: Sequence[int]
) -> torch.Tensor:
    """Float32 log-probabilities with banned tokens and the previous token set to -inf."""
    logits = logits.float().clone()
    if banned_tokens:
        logits[:, list(banned_tokens)] = float("-inf")
    logits.scatter_(1, prefixes[:, -1:], float("-inf"))
    return F.log_softmax(logits, dim=-1)


def _blank_after_eos(generated: torch.Tensor, eos_index: int, padding_index: int) -> torch.Tensor:
    """Replace each row's first [EOS] and everything after it with ``padding_index``."""
    ended = (generated == eos_index).long().cumsum(dim=1) > 0
    return generated.masked_fill(ended, padding_index)


class BeamSearch:
    """Beam search for the highest-scoring caption (sum of token log-probabilities).

    Every step each live beam proposes its ``per_node_beam_size`` best next tokens (2 in the
    official decoder) and the ``beam_size`` best of all extended prefixes survive. A beam that
    has produced [EOS] only continues with [EOS] at log-probability 0, so its score is final.
    Stops when every surviving beam has ended or after ``max_steps`` generated tokens.
    ``beam_size=1`` is greedy decoding.
    """

    def __init__(
        self,
        sos_index: int,
        eos_index: int,
        beam_size: int = 5,
        max_steps: int = 30,
        per_node_beam_size: int = 2,
        banned_tokens: Iterable[int] = (),
        padding_index: int = 0,
    ):
        if beam_size < 1 or max_steps < 1 or per_node_beam_size < 1:
            raise ValueError("beam_size, max_steps and per_node_beam_size must be positive")
        self.sos_index = sos_index
        self.eos_index = eos_index
        self.beam_size = beam_size
        self.max_steps = max_steps
        self.per_node_beam_size = per_node_beam_size
        self.banned_tokens = tuple(banned_tokens)
        self.padding_index = padding_index

    def search(
        self, step: StepFunction, batch_size: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All beams, best first: tokens (B, K, L) incl. trailing [EOS]s, and scores (B, K)."""
        beams = self.beam_size
        prefixes = torch.full((batch_size, 1), self.sos_index, dtype=torch.long, device=device)
        logprobs = _allowed_logprobs(step(prefixes), prefixes, self.banned_tokens)
        scores, first = logprobs.topk(beams, dim=-1)
        # (B, K, t): [SOS] followed by the generated tokens.
        sequences = torch.cat([prefixes.unsqueeze(1).expand(-1, beams, -1), first.unsqueeze(-1)], -1)
        ended = first == self.eos_index
        for _ in range(self.max_steps - 1):
            if ended.all():
                break
            flat = sequences.reshape(batch_size * beams, -1)
            logprobs = _allowed_logprobs(step(flat), flat, self.banned_tokens)
            only_eos = torch.full_like(logprobs, float("-inf"))
            only_eos[:, self.eos_index] = 0.0
            logprobs = torch.where(ended.reshape(-1, 1), only_eos, logprobs)
            candidate_scores, candidate_tokens = logprobs.topk(self.per_node_beam_size, dim=-1)
            totals = scores.reshape(-1, 1) + candidate_scores
            scores, chosen = totals.reshape(batch_size, -1).topk(beams, dim=-1)
            parents = chosen // self.per_node_beam_size
            tokens = candidate_tokens.reshape(batch_size, -1).gather(1, chosen)
            history = sequences.gather(1, parents.unsqueeze(-1).expand(-1, -1, sequences.size(-1)))
            sequences = torch.cat([history, tokens.unsqueeze(-1)], dim=-1)
            ended = ended.gather(1, parents) | (tokens == self.eos_index)
        return sequences[:, :, 1:], scores

    def __call__(
        self, step: StepFunction, batch_size: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The best caption per image: (B, L) tokens, 0 from its [EOS] on."""
        sequences, _ = self.search(step, batch_size, device)
        return _blank_after_eos(sequences[:, 0], self.eos_index, self.padding_index)


class NucleusSampling:
    """Nucleus (top-p) sampling (Holtzman et al., ICLR 2020).

    At each step the tokens are sorted by probability and the smallest prefix whose mass
    reaches ``nucleus_size`` is kept (always at least one token); the next token is drawn
    from that renormalised set. Banned tokens and the previous token are removed *before*
    the nucleus is formed, so it is never empty. Sampling uses a ``torch.Generator`` seeded
    with ``seed`` (created on first use on the decoding device and advanced by every call),
    so a fixed seed and call order give the same captions.
    """

    def __init__(
        self,
        sos_index: int,
        eos_index: int,
        nucleus_size: float = 0.9,
        max_steps: int = 30,
        banned_tokens: Iterable[int] = (),
        padding_index: int = 0,
        seed: int = 0,
    ):
        if not 0.0 < nucleus_size <= 1.0:
            raise ValueError(f"nucleus_size must be in (0, 1], got {nucleus_size}")
        if max_steps < 1:
            raise ValueError("max_steps must be positive")
        self.sos_index = sos_index
        self.eos_index = eos_index
        self.nucleus_size = nucleus_size
        self.max_steps = max_steps
        self.banned_tokens = tuple(banned_tokens)
        self.padding_index = padding_index
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def nucleus_probs(self, logprobs: torch.Tensor) -> torch.Tensor:
        """(N, V) log-probabilities -> (N, V) probabilities renormalised over each nucleus."""
        probs = logprobs.exp()
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs * (mass_before < self.nucleus_size)
        kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        return kept / kept.sum(dim=-1, keepdim=True)

    def __call__(
        self, step: StepFunction, batch_size: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """One sampled caption per image: (B, L) tokens, 0 from its [EOS] on."""
        device = torch.device(device)
        generator = self._generator(device)
        sequences = torch.full((batch_size, 1), self.sos_index, dtype=torch.long, device=device)
        ended = torch.zeros(batch_size, dtype=torch.bool, device=device)
        for _ in range(self.max_steps):
            if ended.all():
                break
            logprobs = _allowed_logprobs(step(sequences), sequences, self.banned_tokens)
            tokens = torch.multinomial(self.nucleus_probs(logprobs), 1, generator=generator)
            tokens = tokens.squeeze(1).masked_fill(ended, self.eos_index)
            sequences = torch.cat([sequences, tokens.unsqueeze(1)], dim=1)
            ended |= tokens == self.eos_index
        return _blank_after_eos(sequences[:, 1:], self.eos_index, self.padding_index)
