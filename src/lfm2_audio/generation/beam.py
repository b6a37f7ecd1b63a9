"""Beam search for a transcript, scored by the language model and, for a model whose text head
learned CTC over its audio positions, by that CTC too.

Greedy decoding commits to the single best token at each step, so one misheard syllable steers
the rest of the transcript. Beam search keeps the `beam` best partial transcripts instead. With
`ctc_weight` w > 0 each one is also scored by how well the clip explains it:

    score(y) = (1 - w) * log p_LM(y) + w * log p_CTC(y as a prefix of the clip's alignment)

(joint CTC / attention decoding, Watanabe et al. 2017). The CTC posteriors are the text head read
over the clip's adapter vectors through the final norm, blank = the pad id 0: what the trainer's
auxiliary CTC loss (`training/loss.ctc_sum`) trains. CTC cannot add words the audio lacks or skip
a stretch of it, the two ways the language model alone goes wrong. Only a model trained with
that loss has such a head; the official checkpoints were not, and they transcribe greedily
unless told otherwise (`config.json` "asr_decoding", a key of this project's own, sets a model's
defaults: the demo model's are beam 3, ctc_weight 0.3).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import MODALITY_AUDIO_IN
from ..errors import InputError
from .chat import Conversation, embed_pending

NEG_INF = -1e30  # log(0) that stays finite through additions


@dataclasses.dataclass(frozen=True)
class AsrDecoding:
    beam: int = 1  # 1 with ctc_weight 0: greedy, the generate() path
    ctc_weight: float = 0.0
    candidates: int = 8  # tokens each hypothesis is extended by per step (the LM's best)

    def __post_init__(self):
        if not isinstance(self.beam, int) or isinstance(self.beam, bool) or not 1 <= self.beam <= 64:
            raise InputError(f"beam must be an integer in [1, 64], got {self.beam!r}")
        if not isinstance(self.ctc_weight, (int, float)) or not 0.0 <= self.ctc_weight <= 1.0:
            raise InputError(f"ctc_weight must be a number in [0, 1], got {self.ctc_weight!r}")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise InputError(f"candidates must be a positive integer, got {self.candidates!r}")

    @property
    def greedy(self) -> bool:
        return self.beam == 1 and self.ctc_weight == 0

    def overridden(self, beam: int | None = None, ctc_weight: float | None = None) -> "AsrDecoding":
        """These settings with the given fields replaced (None keeps a field)."""
        changes = {k: v for k, v in (("beam", beam), ("ctc_weight", ctc_weight)) if v is not None}
        return dataclasses.replace(self, **changes)


def asr_decoding_default(config_extra: dict) -> AsrDecoding:
    """A model's transcription settings: greedy, unless its config.json says otherwise, e.g.
    `"asr_decoding": {"beam": 4, "ctc_weight": 0.5}`."""
    given = config_extra.get("asr_decoding") or {}
    fields = {f.name for f in dataclasses.fields(AsrDecoding)}
    if not isinstance(given, dict) or set(given) - fields:
        raise InputError(f"config.json asr_decoding takes {', '.join(sorted(fields))}, got {given!r}")
    return AsrDecoding(**given)


def ctc_log_probs(model, encoded: torch.Tensor) -> torch.Tensor:
    """Adapter vectors [..., D] -> CTC log-probabilities [..., vocab] (fp32): the text head read
    through the final norm, the head the trainer's auxiliary loss trains (`loss.ctc_sum`)."""
    return model.text_logits(model.lfm.embedding_norm(encoded)).float().log_softmax(-1)


class CTCPrefixScorer:
    """log P(the clip's CTC alignment starts with y) for growing prefixes y, H at a time.

    A prefix's state is its forward variables over the clip's T positions: `n[t]`, the log-prob of
    the paths that have emitted y by position t and end in y's last token, and `b[t]`, those that
    end in a blank."""

    def __init__(self, log_probs: torch.Tensor, end_id: int):
        self.x = log_probs.double()  # [T, V]; float64: the scans below add and take out large sums
        self.end_id = end_id

    def empty(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prefix's state, for `rows` hypotheses: n, b [T, rows]."""
        b = torch.cumsum(self.x[:, 0], 0)[:, None].expand(-1, rows).contiguous()
        return torch.full_like(b, NEG_INF), b

    def extend(self, n: torch.Tensor, b: torch.Tensor, last: torch.Tensor, tokens: torch.Tensor):
        """H prefixes (state n, b [T, H]; last token [H], -1 when empty) each extended by C tokens
        [H, C] -> prefix scores [H, C] and the extended prefixes' state n, b [T, H, C]. The end
        token scores the whole clip: the prefix is then the full transcript."""
        x = self.x[:, tokens]  # [T, H, C]
        whole = torch.logaddexp(n, b)  # [T, H]
        # Paths that may emit the new token at t + 1: all of the prefix's, except that a token
        # repeating the prefix's last one needs a blank between (else CTC merges the two).
        ready = torch.where((tokens == last[:, None])[None], b[:, :, None], whole[:, :, None])  # [T, H, C]
        first = torch.where((last < 0)[:, None], x[0], torch.full_like(x[0], NEG_INF))  # n[0]: nothing before t = 0
        # n[t] = logaddexp(n[t-1], ready[t-1]) + x[t] and b[t] = logaddexp(b[t-1], n[t-1]) + blank[t]
        # are running log-sums once the cumulative emission log-probs are taken out, so each is
        # one logcumsumexp over T instead of T steps.
        emitted = torch.cumsum(torch.cat([torch.zeros_like(x[:1]), x[1:]]), 0)  # sum of x[1..t]
        new_n = emitted + torch.logcumsumexp(torch.cat([first[None], ready[:-1] - emitted[:-1]]), 0)
        blanks = torch.cumsum(torch.cat([torch.zeros_like(self.x[:1, 0]), self.x[1:, 0]]), 0)[:, None, None]
        new_b = blanks + torch.logcumsumexp(torch.cat([torch.full_like(first[None], NEG_INF),
                                                       new_n[:-1] - blanks[:-1]]), 0)
        score = torch.logsumexp(torch.cat([first[None], ready[:-1] + x[1:]]), 0)
        score = torch.where(tokens == self.end_id, whole[-1][:, None], score)
        return score, new_n, new_b


def _copy_rows(cache, rows: torch.Tensor) -> None:
    """Row i of every cache buffer becomes row rows[i] (in place: the buffers stay the ones the
    backbone handed out, which its CUDA graphs may hold)."""
    used = cache.max_len
    for s in cache.conv:
        s.copy_(s[rows])
    for t in cache.keys + cache.values:
        t[:, :, :used] = t[rows, :, :used]
    cache.lengths.copy_(cache.lengths[rows])


def beam_transcript(conv: Conversation, decoding: AsrDecoding, max_new_tokens: int) -> list[int]:
    """The best reply's text token ids (without <|im_end|>) for what `conv` has queued: a prompt
    ending in the assistant's turn opening, whose last audio clip is the one to transcribe. The
    queue is consumed; the reply is not added to the conversation."""
    search = beam_search(conv, decoding, max_new_tokens)
    while True:
        try:
            next(search)
        except StopIteration as done:
            return done.value


@torch.inference_mode()  # on a generator: entered for each step, left at each yield
def beam_search(conv: Conversation, decoding: AsrDecoding, max_new_tokens: int):
    """`beam_transcript` as a generator that yields after each backbone call and returns the
    ids: a serving engine runs one step of it between its batched steps for everyone else."""
    if not conv.pending:
        raise InputError("nothing to transcribe: add a user turn first")
    model, tok = conv.model, conv.tokenizer
    end_id, B = tok.im_end_id, decoding.beam
    clips = [p for p in conv.pending if p.modality == MODALITY_AUDIO_IN]
    encoded = model.encode_audio([p.value for p in clips]) if clips else None
    scorer = None
    if decoding.ctc_weight > 0:
        if not clips:
            raise InputError("ctc_weight needs an audio clip to score the transcript against")
        plain = getattr(model, "model", model)  # the fast engine wraps the plain model as `.model`
        scorer = CTCPrefixScorer(ctc_log_probs(plain, encoded[-clips[-1].positions:].to(plain.dtype)), end_id)
    prompt = embed_pending([conv], encoded)[0]
    P = prompt.shape[0]
    if P + max_new_tokens > conv.max_context:
        raise InputError(f"the prompt ({P} positions) and {max_new_tokens} new tokens exceed the context limit "
                         f"of {conv.max_context}")

    # The prompt runs once, in a one-row cache; its state is then copied into every beam row.
    one = model.lfm.new_cache(1, P)
    h = model.lfm(prompt[None], one)[:, -1]
    yield
    cache = model.lfm.new_cache(B, P + max_new_tokens + 1)
    cache.load(one)
    h = h.expand(B, -1)

    w = decoding.ctc_weight
    C = max(decoding.candidates, B)
    ids = [[] for _ in range(B)]
    lm = torch.full((B,), NEG_INF)
    lm[0] = 0.0  # every row holds the same prompt: only one hypothesis lives at first
    last = torch.full((B,), -1, dtype=torch.long)
    n, b = scorer.empty(B) if scorer else (None, None)
    ctc = torch.zeros(B)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_new_tokens):
        logp = model.text_logits(h).float().log_softmax(-1).cpu()  # [B, V]
        tokens = torch.cat([logp.topk(C, dim=-1).indices, torch.full((B, 1), end_id)], dim=1)  # [B, C + 1]
        repeat = (tokens[:, :C] == end_id).any(dim=1)  # the end token already among the best
        lm_next = lm[:, None] + logp.gather(1, tokens)
        lm_next[repeat, C] = NEG_INF
        if scorer:
            ctc_next, n_next, b_next = scorer.extend(n, b, last, tokens)
            score = (1 - w) * lm_next + w * ctc_next
        else:
            score = lm_next
        score[lm_next <= NEG_INF / 2] = NEG_INF  # dead rows stay dead, whatever the weight
        live = []  # (row, column, score) of the best extensions that go on, best first
        for flat in score.flatten().argsort(descending=True).tolist():
            r, c = divmod(flat, C + 1)
            s = float(score[r, c])
            if s <= NEG_INF / 2:
                break
            if int(tokens[r, c]) == end_id:
                finished.append((s, ids[r]))
            elif len(live) < B:
                live.append((r, c, s))
            else:
                break
        # Scores only fall as a transcript grows (every factor is a probability), so once the
        # best finished one beats every live one, nothing can overtake it.
        if not live or (finished and max(f[0] for f in finished) >= live[0][2]):
            break
        live += [(live[0][0], live[0][1], NEG_INF)] * (B - len(live))  # spare rows: dead copies
        r, c = torch.tensor([x[0] for x in live]), torch.tensor([x[1] for x in live])
        chosen = tokens[r, c]
        ids = [ids[x[0]] + [int(t)] for x, t in zip(live, chosen)]
        lm = lm_next[r, c]
        lm[torch.tensor([x[2] for x in live]) <= NEG_INF / 2] = NEG_INF
        last = chosen
        if scorer:
            ctc, n, b = ctc_next[r, c], n_next[:, r, c], b_next[:, r, c]
        _copy_rows(cache, r.to(cache.lengths.device))
        h = model.lfm(model.lfm.embed_tokens(chosen.to(model.device))[:, None], cache)[:, -1]
        yield
    if not finished:  # out of tokens: the best unfinished transcript
        best = max(range(B), key=lambda i: float((1 - w) * lm[i] + w * ctc[i]))
        return ids[best]
    return max(finished, key=lambda f: f[0])[1]
