"""Autoregressive caption decoding: beam search and nucleus (top-p) sampling, under two rule sets.

Both decoders drive a *step function* ``step(prefixes) -> logits``: ``prefixes`` is an
(N, t) long tensor of token sequences without padding, and the result is the (N, V) next-token
logits of each row (the model's prediction after the last token of the row). Row ``b * k + j``
of a beam search call belongs to image ``b`` (so a model repeats its visual features with
``repeat_interleave``); the first call of both decoders has one row per image.

Both return an (B, L) long tensor of generated tokens without [SOS]. Scores are plain sums of
log-probabilities (no length normalisation); a beam or sample whose last token is [EOS] only
continues with [EOS] (at log-probability 0); decoding stops when every sequence has ended or
after ``max_steps`` generated tokens; the token generated at the previous step is suppressed.
Logits of a half-precision model are converted to float32 first (float32 and float64 are used
as they are). ``rules`` chooses the rest:

``rules="official"`` reproduces the official VirTex decoders token for token (kdexd/virtex
v1.2 and later, checked against commit ae67b23, after v1.4: ``virtex/utils/beam_search.py``,
``virtex/utils/nucleus_sampling.py`` and ``CaptioningModel.decoding_step``);
MODEL.DECODER.NAME ``beam_search`` and ``nucleus_sampling`` build it.

* Beam search, prefixes: step 1 gets [SOS] alone, (B, 1); from step 2 on the step function gets
  the tokens generated so far *without* [SOS], (B * K, t - 1) at step t (the official code keeps
  its predictions without the start token and feeds them as they are, so from step 2 on the
  model sees its first word where it was trained to see [SOS]).
* Beam search, scores: ``log_softmax`` of the logits; from step 2 on, the log-probability of the
  token generated at the previous step is then set to -10000 (the other tokens are not
  renormalised; a penalty, not a ban: it still beats a token scored below -10000); at step 1
  nothing is blocked. No token is banned: <unk> (id 0, also the padding id), [SOS] and [MASK]
  may be generated.
* Nucleus sampling, prefixes: [SOS] followed by the generated tokens, at every step.
* Nucleus sampling, nucleus: formed on the unmodified distribution: the tokens sorted by logit,
  and a token is dropped when the probability mass of the tokens ranked above it *and itself*
  exceeds ``nucleus_size`` unless it is the first such token (so the top token always stays).
  Dropped tokens and the previous token ([SOS] at step 1) get logit -1e12, and the next token
  is drawn from the softmax of those logits. When the nucleus is the previous token alone, all
  logits are -1e12 and the draw is uniform over the whole vocabulary, as in the official code.
* Output: the tokens as the official decoders return them: an ended sequence repeats [EOS] to
  the end, so an id 0 before it is a generated <unk> (the official captioning script decodes
  the whole row with SentencePiece, which writes it " ⁇ ";
  :meth:`pretrain.tokenizer.SentencePieceBPETokenizer.decode_official`).

``rules="ours"`` (MODEL.DECODER.NAME ``beam_search_ours`` and ``nucleus_sampling_ours``):

* Prefixes, both decoders: [SOS] followed by the generated tokens, at every step, (N, t) at
  step t, as the model saw captions in training.
* ``banned_tokens`` (the factory passes padding/<unk>, [SOS] and [MASK]) and the previous token
  ([SOS] at step 1) get logit -inf *before* ``log_softmax``, at every step, so the remaining
  tokens are renormalised and an output id 0 always means "no token". Nucleus sampling forms
  its nucleus on that renormalised distribution: the smallest set of most probable tokens whose
  mass reaches ``nucleus_size``.
* Output: [EOS] and everything a sequence produced after it are replaced by ``padding_index``
  (0).

Both nucleus samplers draw with ``torch.multinomial`` from a ``torch.Generator`` seeded with
``seed`` (created on first use on the decoding device and advanced by every call); on the CPU it
yields the same draws as the official code after ``torch.manual_seed(seed)``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.nn import functional as F

StepFunction = Callable[[torch.Tensor], torch.Tensor]

OFFICIAL = "official"
OURS = "ours"
RULES = (OFFICIAL, OURS)

#: Official beam search: log-probability given to the previous token, from step 2 on.
OFFICIAL_REPEAT_LOGPROB = -10000.0
#: Official nucleus sampling: logit given to the tokens outside the nucleus and the previous one.
OFFICIAL_REMOVED_LOGIT = -1e12


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits of a half-precision (autocast) model in float32; float32/float64 ones as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


class _Rules:
    """What the two rule sets share: validation, banned tokens and the masked log-softmax."""

    def __init__(self, rules: str, banned_tokens: Iterable[int]):
        if rules not in RULES:
            raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
        self.rules = rules
        self.banned_tokens = tuple(banned_tokens)
        if rules == OFFICIAL and self.banned_tokens:
            raise ValueError("the official decoding rules ban no token; use rules='ours'")

    def _allowed_logprobs(self, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Our rule: log-probabilities with banned and previous tokens at -inf, renormalised."""
        logits = _full_precision(logits).clone()
        if self.banned_tokens:
            logits[:, list(self.banned_tokens)] = float("-inf")
        logits.scatter_(1, previous.unsqueeze(1), float("-inf"))
        return F.log_softmax(logits, dim=-1)

    def _output(self, generated: torch.Tensor, eos_index: int, padding_index: int) -> torch.Tensor:
        """What a decoder returns for its (B, L) generated tokens (module docstring): the tokens
        as they are under the official rules; under ours, each row's first [EOS] and everything
        after it replaced with ``padding_index``."""
        if self.rules == OFFICIAL:
            return generated
        ended = (generated == eos_index).long().cumsum(dim=1) > 0
        return generated.masked_fill(ended, padding_index)


class BeamSearch(_Rules):
    """Beam search for the highest-scoring caption (sum of token log-probabilities).

    Every step each live beam proposes its ``per_node_beam_size`` best next tokens (2 in the
    official decoder) and the ``beam_size`` best of all extended prefixes survive. A beam whose
    last token is [EOS] only continues with [EOS] at log-probability 0, so its score is final.
    ``beam_size=1`` is greedy decoding. ``rules``: see the module docstring (``"ours"`` unless
    given; the config's ``beam_search`` is ``"official"``).
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
        rules: str = OURS,
    ):
        super().__init__(rules, banned_tokens)
        if beam_size < 1 or max_steps < 1 or per_node_beam_size < 1:
            raise ValueError("beam_size, max_steps and per_node_beam_size must be positive")
        self.sos_index = sos_index
        self.eos_index = eos_index
        self.beam_size = beam_size
        self.max_steps = max_steps
        self.per_node_beam_size = per_node_beam_size
        self.padding_index = padding_index

    def _prefixes(self, generated: torch.Tensor) -> torch.Tensor:
        """What the step function gets after step 1, from the (N, t) tokens generated so far."""
        if self.rules == OFFICIAL:
            return generated
        return F.pad(generated, (1, 0), value=self.sos_index)

    def _logprobs(self, logits: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """(N, V) scores of the next token; ``previous`` is None at step 1 (after [SOS])."""
        if self.rules == OURS:
            if previous is None:
                previous = torch.full(logits.shape[:1], self.sos_index, device=logits.device)
            return self._allowed_logprobs(logits, previous)
        logprobs = F.log_softmax(_full_precision(logits), dim=-1)
        if previous is not None:
            logprobs.scatter_(1, previous.unsqueeze(1), OFFICIAL_REPEAT_LOGPROB)
        return logprobs

    def search(
        self, step: StepFunction, batch_size: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All beams, best first: tokens (B, K, L) incl. trailing [EOS]s, and scores (B, K)."""
        beams = self.beam_size
        start = torch.full((batch_size, 1), self.sos_index, dtype=torch.long, device=device)
        scores, first = self._logprobs(step(start), None).topk(beams, dim=-1)
        generated = first.unsqueeze(-1)  # (B, K, t): the generated tokens, without [SOS]
        for _ in range(self.max_steps - 1):
            ended = generated[:, :, -1] == self.eos_index
            if ended.all():
                break
            flat = generated.reshape(batch_size * beams, -1)
            logprobs = self._logprobs(step(self._prefixes(flat)), flat[:, -1])
            only_eos = torch.full_like(logprobs, float("-inf"))
            only_eos[:, self.eos_index] = 0.0
            logprobs = torch.where(ended.reshape(-1, 1), only_eos, logprobs)
            candidate_scores, candidate_tokens = logprobs.topk(self.per_node_beam_size, dim=-1)
            totals = scores.reshape(-1, 1) + candidate_scores
            scores, chosen = totals.reshape(batch_size, -1).topk(beams, dim=-1)
            parents = chosen // self.per_node_beam_size
            tokens = candidate_tokens.reshape(batch_size, -1).gather(1, chosen)
            history = generated.gather(1, parents.unsqueeze(-1).expand(-1, -1, generated.size(-1)))
            generated = torch.cat([history, tokens.unsqueeze(-1)], dim=-1)
        return generated, scores

    def __call__(
        self, step: StepFunction, batch_size: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The best caption per image: (B, L) tokens (module docstring: "Output")."""
        sequences, _ = self.search(step, batch_size, device)
        return self._output(sequences[:, 0], self.eos_index, self.padding_index)


class NucleusSampling(_Rules):
    """Nucleus (top-p) sampling (Holtzman et al., ICLR 2020).

    At each step the next token is drawn from the most probable tokens whose mass reaches
    ``nucleus_size`` (always at least one token), renormalised; the previous token is never
    drawn. ``rules`` decides on which distribution the nucleus is formed and how the previous
    and banned tokens are removed (module docstring; ``"ours"`` unless given, the config's
    ``nucleus_sampling`` is ``"official"``). A fixed seed and call order give the same captions.
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
        rules: str = OURS,
    ):
        super().__init__(rules, banned_tokens)
        if not 0.0 < nucleus_size <= 1.0:
            raise ValueError(f"nucleus_size must be in (0, 1], got {nucleus_size}")
        if max_steps < 1:
            raise ValueError("max_steps must be positive")
        self.sos_index = sos_index
        self.eos_index = eos_index
        self.nucleus_size = nucleus_size
        self.max_steps = max_steps
        self.padding_index = padding_index
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def nucleus_probs(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Our rule: (N, V) log-probabilities -> probabilities renormalised over each nucleus."""
        probs = logprobs.exp()
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs * (mass_before < self.nucleus_size)
        kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        return kept / kept.sum(dim=-1, keepdim=True)

    def official_nucleus_probs(self, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The official rule: (N, V) logits -> sampling probabilities (module docstring)."""
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        beyond = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1) > self.nucleus_size
        # The first token whose cumulative mass exceeds the nucleus size stays in it.
        dropped_sorted = F.pad(beyond[:, :-1], (1, 0), value=False)
        dropped = torch.zeros_like(dropped_sorted).scatter_(1, order, dropped_sorted)
        logits = logits.masked_fill(dropped, OFFICIAL_REMOVED_LOGIT)
        logits.scatter_(1, previous.unsqueeze(1), OFFICIAL_REMOVED_LOGIT)
        return F.softmax(logits, dim=-1)

    def _probs(self, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        if self.rules == OFFICIAL:
            return self.official_nucleus_probs(_full_precision(logits), previous)
        return self.nucleus_probs(self._allowed_logprobs(logits, previous))

    def __call__(
        self, step: StepFunction, batch_size: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """One sampled caption per image: (B, L) tokens (module docstring: "Output")."""
        device = torch.device(device)
        generator = self._generator(device)
        sequences = torch.full((batch_size, 1), self.sos_index, dtype=torch.long, device=device)
        for _ in range(self.max_steps):
            ended = sequences[:, -1] == self.eos_index
            if ended.all():
                break
            probs = self._probs(step(sequences), sequences[:, -1])
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            tokens = tokens.masked_fill(ended, self.eos_index)
            sequences = torch.cat([sequences, tokens.unsqueeze(1)], dim=1)
        return self._output(sequences[:, 1:], self.eos_index, self.padding_index)
