"""Prompt building: templates are data (``PromptConfig`` strings), prompts are concatenated token ids.

Every item's title (and, for the ``verbose`` paradigm, description) is tokenized ONCE when the
builder is created; every template fragment is tokenized once too. Building a batch is then only
``np.concatenate`` of cached id arrays plus padding, so it is cheap enough to run per step.

Prompt layout (plain text, no chat template, so any causal LM works the same way)::

    {system}\\n{history_header}\\n
    {history_item} x len(history)        e.g. "{ordinal}{item}\\n"
    {candidates_header}\\n
    {candidate_item} x N                 e.g. "{label}.{item}\\n"
    {answer_prefix}                      then the answer: " C" (score) or " <title><eos>" (generate)

``{item}`` is, per paradigm:

* ``verbose``: title + description (truncated to ``description_tokens`` tokens) via ``verbose_item``;
  candidates are written as titles.
* ``titles``: the title (truncated to ``title_tokens`` tokens).
* ``speeder``: ``k`` placeholder tokens whose embeddings are replaced by the MRC item tokens
  (plus SPAE absolute/relative embeddings for history items); optional textual ordinals.

Item text is inserted with a leading space (so ``"{label}.{item}"`` reads ``" A. Blue pen"``).
Candidates are labelled with single-token labels (``" A"``, ``" B"``, ...); if a label is not a
single token in the tokenizer, all labels fall back to added special tokens ``<|cand_i|>``
(recorded in :attr:`PromptBuilder.added_tokens` so a run can restore them).
"""

from __future__ import annotations

import dataclasses
import functools
import string
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch

from speeder_fast.config import PARADIGMS, PromptConfig
from speeder_fast.data.dataset import RecDataset
from speeder_fast.utils import get_logger

from .packing import PackedBatch

log = get_logger("speeder_fast.prompts")

__all__ = ["PARADIGMS", "PromptBatch", "PromptBuilder", "ordinal_word", "pack_numpy"]


def ordinal_word(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    if 10 <= n % 100 <= 20:
        suf = "th"
    else:
        suf = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suf}"


@dataclass
class PromptBatch:
    """A padded batch of prompts (tensors) plus the bookkeeping scoring and evaluation need.

    Shapes: ``B`` examples, ``L`` padded length, ``N`` candidates, ``U`` unique items, ``A`` answer
    tokens in the whole batch. Slot arrays are ``-1`` where a position holds plain text.
    """

    input_ids: torch.Tensor  # int64 [B, L]
    attention_mask: torch.Tensor  # int64 [B, L]
    labels: torch.Tensor  # int64 [B, L], HF convention (labels[b,p] == input_ids[b,p] on answer tokens, else -100)
    slot_item: torch.Tensor  # int64 [B, L]: row of item_tokens.view(-1, H) = u*k + t
    slot_abs: torch.Tensor  # int64 [B, L]: history index from oldest (0-based)
    slot_rel: torch.Tensor  # int64 [B, L]: distance from the newest history item (0 = newest)
    unique_items: torch.Tensor  # int64 [U]: items compressed once for the batch
    answer_pos: torch.Tensor  # int64 [B]: position whose next-token logits give the answer distribution
    loss_pos: torch.Tensor  # int64 [A]: flat index b*L+p of positions predicting an answer token
    loss_targets: torch.Tensor  # int64 [A]: the answer token predicted there
    target_idx: torch.Tensor  # int64 [B]: index of the correct candidate
    candidates: torch.Tensor  # int64 [B, N]: item ids in label order
    label_token_ids: torch.Tensor  # int64 [N]
    prompt_tokens: torch.Tensor  # int64 [B]: prompt length without the answer
    history_lengths: torch.Tensor  # int64 [B]
    # next-item head (answer_mode=item): flat positions b*L+p whose hidden state predicts an item, the
    # items they predict (every history slot predicts the next history item, the last one the
    # target), and each example's target item (-1 unknown); empty in the other answer modes
    item_pos: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # int64 [P]
    item_targets: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # int64 [P]
    target_items: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # int64 [B]
    # padding-free form built on the host at build time (extras: input_ids is the packed row;
    # extras = (slot_item, slot_abs, slot_rel)); used by SpeederRecModel when packing is on
    packed: PackedBatch | None = None
    # True for right-padded batches (training / scoring): every real token precedes the padding, so
    # causal attention without a padding mask is exact at every real position (lets SDPA pick its
    # fused causal kernel instead of materialising an [L, L] mask); False for left-padded generation.
    right_padded: bool = True
    # token ids every row starts with (its first real tokens; host tuple, ``PromptBuilder.head_ids``):
    # the shared instruction the model may serve from its prefix KV cache; () = none declared
    prefix: tuple[int, ...] = ()
    # cross-fitting (features.sasrec_crossfit): the collab fold every row of this training batch belongs
    # to, whose table the MoME reads for it (MoME.using_fold); None = the reference table
    fold: int | None = None

    def to(self, device: torch.device | str) -> "PromptBatch":
        """Move every tensor (and the packed form) to ``device`` (non-blocking)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=True) if hasattr(v, "to") else v
        return PromptBatch(**kw)

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens (host-side count, computed before moving to a device)."""
        return int(self.attention_mask.sum())


def pack_numpy(lengths: np.ndarray, L: int, padding_side: str, input_ids: np.ndarray,
               *extra: np.ndarray) -> PackedBatch:
    """The :class:`PackedBatch` of a left/right padded ``[B, L]`` batch with row ``lengths``,
    computed in numpy on the host (same result as :func:`pack_padded`, without torch's
    small-op overhead at collate time)."""
    B = len(lengths)
    lengths = np.asarray(lengths, np.int64)
    cu = np.zeros(B + 1, np.int64)
    cu[1:] = np.cumsum(lengths)
    T = int(cu[-1])
    seq_index = np.repeat(np.arange(B, dtype=np.int64), lengths)
    pos = np.arange(T, dtype=np.int64) - cu[:-1][seq_index]
    offs = np.zeros(B, np.int64) if padding_side == "right" else L - lengths
    flat_index = seq_index * L + offs[seq_index] + pos
    p2p = np.full(B * L, -1, np.int64)
    p2p[flat_index] = np.arange(T, dtype=np.int64)

    def row(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x.reshape(-1)[flat_index])).unsqueeze(0)

    return PackedBatch(
        input_ids=row(input_ids),
        position_ids=torch.from_numpy(pos).unsqueeze(0),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(lengths.max()) if B else 0,
        seq_index=torch.from_numpy(seq_index),
        lengths=torch.from_numpy(lengths.copy()),
        flat_index=torch.from_numpy(flat_index),
        padded_to_packed=torch.from_numpy(p2p.reshape(B, L)),
        extras=tuple(row(e) for e in extra),
        padded_shape=(B, L),
    )


def _split_template(template: str, names: Sequence[str], where: str) -> list[str]:
    """Split ``template`` on ``{name}`` fields (in the given order); raises on a missing field."""
    parts = []
    rest = template
    for n in names:
        key = "{" + n + "}"
        if key not in rest:
            raise ValueError(f"prompt.{where}: template {template!r} must contain {key} (after the previous field)")
        head, rest = rest.split(key, 1)
        parts.append(head)
    parts.append(rest)
    return parts


class PromptBuilder:
    """Turns (history, candidates, target) arrays into a :class:`PromptBatch`.

    Args:
        tokenizer: a HF tokenizer (fast tokenizers make the one-off pre-tokenization quick).
        dataset: the item table (titles, descriptions).
        cfg: prompt templates and budgets.
        n_candidates: N, the number of candidates per example.
        max_history: the longest history a prompt holds.
        n_item_tokens: k, soft tokens per item (``speeder``).
        ordinal_text: write textual ordinals for history items (``speeder`` and others).
    """

    def __init__(
        self,
        tokenizer: Any,
        dataset: RecDataset,
        cfg: PromptConfig,
        n_candidates: int,
        max_history: int,
        n_item_tokens: int = 1,
        ordinal_text: bool = False,
    ) -> None:
        if cfg.paradigm not in PARADIGMS:
            raise ValueError(f"prompt.paradigm: {cfg.paradigm!r} is not one of {PARADIGMS}")
        self.tok = tokenizer
        self.cfg = cfg
        self.paradigm = cfg.paradigm
        self.answer_mode = cfg.answer_mode
        #: next-item head: no candidate list, no answer prefix; the hidden state at the end of each
        #: history line predicts the next item (see :meth:`build`)
        self.item_mode = cfg.answer_mode == "item"
        self.k = int(n_item_tokens)
        self.n_candidates = 0 if self.item_mode else int(n_candidates)
        self.max_history = int(max_history)
        self.added_tokens: list[str] = []
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token; generate mode and padding need one")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # placeholder id for soft-token slots (its embedding is overwritten, the id only matters for display)
        self.placeholder_id = self.pad_id

        self.label_strings, self.label_ids = self._resolve_labels(cfg.labels)
        enc = self._encode
        # static fragments (item mode: its own instruction, no candidates block, no answer prefix)
        self.head_ids = enc(f"{cfg.item_instruction}\n" if self.item_mode else f"{cfg.system}\n{cfg.history_header}\n")
        #: the fixed prefix of every prompt (``PromptBatch.prefix``; served by the prefix KV cache)
        self.prefix_ids: tuple[int, ...] = tuple(int(i) for i in self.head_ids)
        self.cand_head_ids = enc("" if self.item_mode else f"{cfg.candidates_header}\n")
        self.answer_prefix_ids = enc("" if self.item_mode else cfg.answer_prefix)
        hist_pre, self.hist_post_ids = _split_template(cfg.history_item, ["item"], "history_item")
        self.hist_pre_ids = []
        for i in range(self.max_history):
            ordinal = cfg.ordinal_format.format(ordinal=ordinal_word(i + 1)) if ordinal_text else ""
            self.hist_pre_ids.append(enc(hist_pre.format(ordinal=ordinal)))
        self.hist_post_ids = enc(self.hist_post_ids)
        # candidate line: "{label}...{item}..." or "{item}...{label}..." (label token spliced as an id)
        label_first = cfg.candidate_item.find("{label}") < cfg.candidate_item.find("{item}")
        order = ["label", "item"] if label_first else ["item", "label"]
        c_pre, c_mid, c_post = _split_template(cfg.candidate_item, order, "candidate_item")
        pre, mid, post = enc(c_pre), enc(c_mid), enc(c_post)
        if label_first:
            self.cand_line_pre = [np.concatenate([pre, [lid], mid]).astype(np.int64) for lid in self.label_ids]
            self.cand_line_post = [post for _ in self.label_ids]
        else:
            self.cand_line_pre = [pre for _ in self.label_ids]
            self.cand_line_post = [np.concatenate([mid, [lid], post]).astype(np.int64) for lid in self.label_ids]

        # per-item token caches (lists of int64 arrays; tokenized once, batched)
        n_items = dataset.n_items
        titles = dataset.item_text.get("title") or [""] * n_items
        titles = [t.strip() or f"item {dataset.item_ids[i]}" for i, t in enumerate(titles)]
        self.titles = titles
        self.title_ids = self._encode_many([" " + t for t in titles], cfg.title_tokens)
        self.title_text = [self.tok.decode(ids.tolist()).strip() for ids in self.title_ids]
        self.full_title_ids: dict[int, np.ndarray] = {}
        self.full_title_text = self._title_collisions()  # items whose truncated titles collide -> full title
        self.verbose_ids: list[np.ndarray] | None = None
        if self.paradigm == "verbose":
            descs = dataset.item_text.get("description") or [""] * n_items
            desc_ids = self._encode_many([" " + d.strip() if d.strip() else "" for d in descs], cfg.description_tokens)
            v_pre, v_mid, v_post = _split_template(cfg.verbose_item, ["title", "description"], "verbose_item")
            pre, mid, post = enc(v_pre), enc(v_mid), enc(v_post)
            self.verbose_ids = [
                np.concatenate([pre, t, mid, d, post]) if len(d) else np.concatenate([pre, t]) for t, d in zip(self.title_ids, desc_ids)
            ]
        self.desc_token_counts = None

    def _title_collisions(self) -> dict[int, str]:
        """``{item: decoded full title}`` for the items whose truncated title (``prompt.title_tokens``)
        equals another item's: a generation of that text names no single item, so
        :func:`~speeder_fast.model.llm.match_generated` then compares against these full titles.

        In generate mode a warning counts the colliding items, those whose full titles are identical
        as well (never separable), and the ``prompt.title_tokens`` that would separate the others.
        """
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self.title_text):
            groups.setdefault(t, []).append(i)
        clashing = [g for g in groups.values() if len(g) > 1]
        if not clashing:
            return {}
        items = [i for g in clashing for i in g]
        full = dict(zip(items, self._encode_many([" " + self.titles[i] for i in items], 1 << 30)))
        self.full_title_ids = full
        identical, need = 0, 0
        for g in clashing:
            seqs = sorted(tuple(full[i].tolist()) for i in g)
            for a, b in zip(seqs, seqs[1:]):
                if a == b:
                    continue
                lcp = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                need = max(need, lcp + 1)
            identical += sum(n for n in (seqs.count(x) for x in set(seqs)) if n > 1)
        if self.answer_mode == "generate":
            sep = f"; prompt.title_tokens={need} would separate the others" if need else ""
            log.warning("prompt.title_tokens=%d: %d items share their truncated title with another item (%d titles, "
                        "e.g. %r), so a generated title cannot name them; generations are matched against the full "
                        "title then. %d of them have identical full titles (never separable)%s",
                        self.cfg.title_tokens, len(items), len(clashing), self.title_text[clashing[0][0]],
                        identical, sep)
        return {i: self.tok.decode(full[i].tolist()).strip() for i in items}

    # ----------------------------------------------------------------- tokenization helpers
    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64) if text else np.zeros(0, np.int64)

    def _encode_many(self, texts: list[str], max_tokens: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        step = 1024
        for s in range(0, len(texts), step):
            chunk = texts[s : s + step]
            ids = self.tok(chunk, add_special_tokens=False)["input_ids"]
            out.extend(np.asarray(x[:max_tokens], dtype=np.int64) for x in ids)
        return out

    def _resolve_labels(self, labels: list) -> tuple[list[str], np.ndarray]:
        """Pick N single-token labels; fall back to added special tokens when one is not single."""
        n = self.n_candidates
        wanted = list(labels) if labels else [" " + c for c in (string.ascii_uppercase + string.ascii_lowercase)[:n]]
        if len(wanted) < n:
            wanted += [f" C{i}" for i in range(len(wanted), n)]
        wanted = wanted[:n]
        ids = [self.tok(w, add_special_tokens=False)["input_ids"] for w in wanted]
        if all(len(x) == 1 for x in ids) and len({x[0] for x in ids}) == n:
            return wanted, np.asarray([x[0] for x in ids], dtype=np.int64)
        specials = [f"<|cand_{i}|>" for i in range(n)]
        self.tok.add_tokens(specials, special_tokens=True)
        self.added_tokens = specials
        ids2 = [self.tok.convert_tokens_to_ids(s) for s in specials]
        return specials, np.asarray(ids2, dtype=np.int64)

    # ----------------------------------------------------------------- items as token pieces
    def item_text_ids(self, item: int, history: bool) -> np.ndarray:
        """Text ids of one item (verbose history items carry the description)."""
        if history and self.verbose_ids is not None:
            return self.verbose_ids[item]
        return self.title_ids[item]

    def answer_ids(self, item: int) -> np.ndarray:
        """Token ids a generated answer spells for ``item``, eos excluded: its title (at most
        ``prompt.title_tokens`` tokens, the generate-mode training target), or its full title when
        the truncated one collides with another item's (as :func:`match_generated` matches)."""
        return self.full_title_ids.get(item, self.title_ids[item])

    @functools.cached_property
    def _answer_table(self) -> np.ndarray:
        """int64 ``[n_items, S]``: :meth:`answer_ids` + eos of every item, ``-1`` padded (built once)."""
        seqs = [self.answer_ids(i) for i in range(len(self.title_ids))]
        S = max(len(x) for x in seqs) + 1
        out = np.full((len(seqs), S), -1, np.int64)
        for i, x in enumerate(seqs):  # once per builder
            out[i, : len(x)] = x
            out[i, len(x)] = self.eos_id
        return out

    def answer_sequences(self, candidates: np.ndarray | torch.Tensor) -> np.ndarray:
        """The constrained decoder's trie of each row: int64 ``[B, N, S]`` answer ids of the candidates
        (:meth:`answer_ids` + eos, ``-1`` padded, ``S`` = the longest in this batch), from a
        catalogue table gathered in one numpy index (no per-example loop)."""
        c = np.asarray(candidates.cpu() if isinstance(candidates, torch.Tensor) else candidates, dtype=np.int64)
        seqs = self._answer_table[c]
        used = (seqs >= 0).any(axis=tuple(range(seqs.ndim - 1)))
        return np.ascontiguousarray(seqs[..., : int(used.nonzero()[0].max()) + 1 if used.any() else 0])

    def decode_answer(self, ids: Sequence[int]) -> str:
        """Decoded generated answer, stripped (generation stops at eos)."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    # ----------------------------------------------------------------- lengths without building
    @functools.cached_property
    def _length_tables(self) -> dict[str, np.ndarray | int]:
        """Token counts of every cached piece (computed once, then reused by :meth:`prompt_lengths`)."""

        def lens(pieces: Sequence[np.ndarray]) -> np.ndarray:
            return np.fromiter((len(x) for x in pieces), np.int64, len(pieces))

        title = lens(self.title_ids)
        return {
            "title": title,
            "hist_text": title if self.verbose_ids is None else lens(self.verbose_ids),
            # fixed text of a prompt: header, candidates header, candidate line frames, answer prefix
            "fixed": len(self.head_ids) + len(self.cand_head_ids) + len(self.answer_prefix_ids)
            + sum(len(a) + len(b) for a, b in zip(self.cand_line_pre, self.cand_line_post)),
            "hist_pre_cum": np.concatenate([[0], np.cumsum(lens(self.hist_pre_ids))]).astype(np.int64),  # [max_history + 1]
            "hist_post": len(self.hist_post_ids),
        }

    def prompt_lengths(
        self,
        histories: np.ndarray,
        lengths: np.ndarray,
        candidates: np.ndarray,
        with_answer: bool = True,
        text_only: np.ndarray | None = None,
        targets: np.ndarray | None = None,
    ) -> np.ndarray:
        """Exact token count of every prompt, computed from cached piece lengths (no tensors built).

        Equals ``build(histories, lengths, candidates, targets, with_answer, text_only).attention_mask.sum(1)``
        (vectorised numpy, cheap enough for a whole epoch). The answer is one label token in
        ``score`` mode (any target); in ``generate`` mode it is the target's title plus eos, so
        ``with_answer=True`` needs ``targets`` there. Returns int64 ``[B]``.
        """
        histories = np.asarray(histories, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if self.item_mode:
            candidates = np.zeros((len(lengths), 0), np.int64)
        candidates = np.asarray(candidates, dtype=np.int64)
        if candidates.ndim != 2 or candidates.shape[1] != self.n_candidates:
            raise ValueError(f"candidates have shape {candidates.shape}, the builder was made for "
                             f"{self.n_candidates} columns")
        B = candidates.shape[0]
        tab = self._length_tables
        soft = np.zeros(B, dtype=bool)
        if self.paradigm == "speeder":
            soft = np.ones(B, dtype=bool) if text_only is None else ~np.asarray(text_only, dtype=bool)
        n_hist = np.minimum(lengths, self.max_history)
        # history window histories[b, lengths[b] - n_hist[b] : lengths[b]]
        col = np.arange(histories.shape[1], dtype=np.int64)[None, :]
        in_win = (col >= (lengths - n_hist)[:, None]) & (col < lengths[:, None])
        hist_item = np.where(in_win, tab["hist_text"][np.clip(histories, 0, None)], 0).sum(1)
        cand_item = tab["title"][candidates].sum(1)
        out = (tab["fixed"] + tab["hist_pre_cum"][n_hist] + n_hist * tab["hist_post"]
               + np.where(soft, n_hist * self.k, hist_item) + np.where(soft, self.n_candidates * self.k, cand_item))
        if with_answer and not self.item_mode:  # item mode appends no answer tokens
            if self.answer_mode == "score":
                out = out + 1
            else:
                if targets is None:
                    raise ValueError("prompt_lengths: generate mode with with_answer=True needs targets "
                                     "(the answer is the target's title)")
                out = out + tab["title"][np.asarray(targets, dtype=np.int64)] + 1
        return out.astype(np.int64)

    # ----------------------------------------------------------------- batch assembly
    def build(
        self,
        histories: np.ndarray,
        lengths: np.ndarray,
        candidates: np.ndarray,
        targets: np.ndarray | None = None,
        with_answer: bool = True,
        text_only: np.ndarray | None = None,
        padding_side: str = "right",
    ) -> PromptBatch:
        """Assemble a padded batch.

        Args:
            histories: int64 [B, H] item ids, oldest first, -1 padded on the right.
            lengths: int64 [B] history lengths.
            candidates: int64 [B, N] item ids (label i <-> candidates[:, i]); ignored (may be None)
                in item mode, whose prompt lists no candidates.
            targets: int64 [B] target item ids (must appear in each candidate row); None when unknown
                (then ``target_idx`` is -1 and no answer can be appended).
            with_answer: append the answer tokens (training); False for scoring/generation prompts.
                In item mode nothing is appended: ``item_pos`` / ``item_targets`` list the end of
                every history line (line ``i`` predicts history item ``i + 1``, the last line -- the
                answer position -- predicts the target).
            text_only: bool [B]; for the ``speeder`` paradigm, examples written with titles instead of
                soft tokens (MPO curriculum). Ignored for other paradigms.
            padding_side: 'right' (training/scoring) or 'left' (generation).
        """
        histories = np.asarray(histories, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if self.item_mode:  # the prompt lists no candidates (evaluation ranks them from the catalogue scores)
            candidates = np.zeros((len(lengths), 0), np.int64)
        candidates = np.asarray(candidates, dtype=np.int64)
        B, N = candidates.shape
        if N != self.n_candidates:
            raise ValueError(f"candidates have {N} columns, the builder was made for {self.n_candidates}")
        target_items = np.full(B, -1, np.int64) if targets is None else np.asarray(targets, dtype=np.int64)
        if self.item_mode:
            target_idx = np.full(B, -1, np.int64)
        elif targets is not None:
            hit = candidates == np.asarray(targets, dtype=np.int64)[:, None]
            if not np.all(hit.sum(1) == 1):
                bad = int(np.flatnonzero(hit.sum(1) != 1)[0])
                raise ValueError(f"example {bad}: the target must appear exactly once among its candidates")
            target_idx = hit.argmax(1).astype(np.int64)
        else:
            target_idx = np.full(B, -1, np.int64)
            with_answer = False
        if text_only is None:
            text_only = np.zeros(B, dtype=bool)
        soft = (self.paradigm == "speeder") & ~np.asarray(text_only, dtype=bool)
        k = self.k

        rows_ids, rows_item, rows_t, rows_abs, rows_rel, rows_ans = [], [], [], [], [], []
        readouts: list[list[int]] = []  # item mode: in-row position of the end of each history line
        prompt_len = np.zeros(B, np.int64)
        for b in range(B):
            ids: list[np.ndarray] = [self.head_ids]
            it: list[np.ndarray] = [np.full(len(self.head_ids), -1, np.int64)]
            ab: list[np.ndarray] = [it[0]]
            n_hist = int(min(lengths[b], self.max_history))
            hist = histories[b, int(lengths[b]) - n_hist : int(lengths[b])]
            readouts.append([])
            for i, item in enumerate(hist):
                if i:
                    readouts[b].append(sum(len(x) for x in ids) - 1)
                pre = self.hist_pre_ids[i]
                ids.append(pre)
                it.append(np.full(len(pre), -1, np.int64))
                ab.append(it[-1])
                if soft[b]:
                    ids.append(np.full(k, self.placeholder_id, np.int64))
                    it.append(np.full(k, item, np.int64))
                    ab.append(np.full(k, i, np.int64))
                else:
                    piece = self.item_text_ids(int(item), history=True)
                    ids.append(piece)
                    it.append(np.full(len(piece), -1, np.int64))
                    ab.append(it[-1])
                ids.append(self.hist_post_ids)
                it.append(np.full(len(self.hist_post_ids), -1, np.int64))
                ab.append(it[-1])
            ids.append(self.cand_head_ids)
            it.append(np.full(len(self.cand_head_ids), -1, np.int64))
            ab.append(it[-1])
            for j in range(N):
                item = int(candidates[b, j])
                pre = self.cand_line_pre[j]
                ids.append(pre)
                it.append(np.full(len(pre), -1, np.int64))
                ab.append(it[-1])
                if soft[b]:
                    ids.append(np.full(k, self.placeholder_id, np.int64))
                    it.append(np.full(k, item, np.int64))
                    ab.append(np.full(k, -2, np.int64))  # candidate slot: item token, no position cue
                else:
                    piece = self.title_ids[item]
                    ids.append(piece)
                    it.append(np.full(len(piece), -1, np.int64))
                    ab.append(it[-1])
                post = self.cand_line_post[j]
                ids.append(post)
                it.append(np.full(len(post), -1, np.int64))
                ab.append(it[-1])
            ids.append(self.answer_prefix_ids)
            it.append(np.full(len(self.answer_prefix_ids), -1, np.int64))
            ab.append(it[-1])
            row_ids = np.concatenate(ids)
            prompt_len[b] = len(row_ids)
            if with_answer and not self.item_mode:
                if self.answer_mode == "score":
                    ans = self.label_ids[target_idx[b] : target_idx[b] + 1]
                else:
                    ans = np.concatenate([self.title_ids[int(candidates[b, target_idx[b]])], [self.eos_id]]).astype(np.int64)
            else:
                ans = np.zeros(0, np.int64)
            row_item = np.concatenate(it + [np.full(len(ans), -1, np.int64)])
            row_abs = np.concatenate(ab + [np.full(len(ans), -1, np.int64)])
            # token index within an item's k slots: consecutive runs of k
            row_t = np.full(len(row_item), -1, np.int64)
            slot = row_item >= 0
            row_t[slot] = np.arange(int(slot.sum())) % k
            rel = np.where(row_abs >= 0, n_hist - 1 - row_abs, -1)
            rows_ids.append(np.concatenate([row_ids, ans]))
            rows_item.append(row_item)
            rows_t.append(row_t)
            rows_abs.append(np.where(row_abs >= 0, row_abs, -1))
            rows_rel.append(rel)
            rows_ans.append(len(ans))

        L = max(len(r) for r in rows_ids)
        input_ids = np.full((B, L), self.pad_id, np.int64)
        attn = np.zeros((B, L), np.int64)
        labels = np.full((B, L), -100, np.int64)
        s_item = np.full((B, L), -1, np.int64)
        s_t = np.full((B, L), -1, np.int64)
        s_abs = np.full((B, L), -1, np.int64)
        s_rel = np.full((B, L), -1, np.int64)
        answer_pos = np.zeros(B, np.int64)
        loss_pos, loss_tg = [], []
        item_pos, item_tg = [], []
        for b in range(B):
            n = len(rows_ids[b])
            off = 0 if padding_side == "right" else L - n
            if self.item_mode and with_answer and targets is not None:
                # history line i (i < n-1) predicts history item i+1; the last line (the answer
                # position) predicts the target
                n_hist = int(min(lengths[b], self.max_history))
                hist = histories[b, int(lengths[b]) - n_hist : int(lengths[b])]
                item_pos.append(b * L + off + np.asarray(readouts[b] + [int(prompt_len[b]) - 1], np.int64))
                item_tg.append(np.append(hist[1:], target_items[b]).astype(np.int64))
            sl = slice(off, off + n)
            input_ids[b, sl] = rows_ids[b]
            attn[b, sl] = 1
            s_item[b, sl] = rows_item[b]
            s_t[b, sl] = rows_t[b]
            s_abs[b, sl] = rows_abs[b]
            s_rel[b, sl] = rows_rel[b]
            p0 = off + int(prompt_len[b])
            answer_pos[b] = p0 - 1
            na = rows_ans[b]
            if na:
                labels[b, p0 : p0 + na] = rows_ids[b][int(prompt_len[b]) :]
                loss_pos.append(b * L + np.arange(p0 - 1, p0 - 1 + na))
                loss_tg.append(rows_ids[b][int(prompt_len[b]) :])
        # dedupe items across the batch: each is compressed once, then gathered via slot_item
        used = s_item >= 0
        unique_items = np.unique(s_item[used]) if used.any() else np.zeros(0, np.int64)
        slot_item = np.full((B, L), -1, np.int64)
        slot_item[used] = np.searchsorted(unique_items, s_item[used]) * k + s_t[used]

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))

        return PromptBatch(
            input_ids=t(input_ids),
            attention_mask=t(attn),
            labels=t(labels),
            slot_item=t(slot_item),
            slot_abs=t(s_abs),
            slot_rel=t(s_rel),
            unique_items=t(unique_items),
            answer_pos=t(answer_pos),
            loss_pos=t(np.concatenate(loss_pos) if loss_pos else np.zeros(0, np.int64)),
            loss_targets=t(np.concatenate(loss_tg) if loss_tg else np.zeros(0, np.int64)),
            target_idx=t(target_idx),
            candidates=t(candidates),
            label_token_ids=t(self.label_ids),
            prompt_tokens=t(prompt_len),
            history_lengths=t(np.minimum(lengths, self.max_history)),
            item_pos=t(np.concatenate(item_pos) if item_pos else np.zeros(0, np.int64)),
            item_targets=t(np.concatenate(item_tg) if item_tg else np.zeros(0, np.int64)),
            target_items=t(target_items),
            packed=pack_numpy(np.asarray([len(r) for r in rows_ids], np.int64), L, padding_side,
                              input_ids, slot_item, s_abs, s_rel),
            right_padded=padding_side == "right",
            prefix=self.prefix_ids,
        )

    def render(self, batch: PromptBatch, b: int = 0) -> str:
        """Human-readable text of example ``b`` (soft-token slots shown as ``<item:ID>``)."""
        ids = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        slots = batch.slot_item[b][batch.attention_mask[b].bool()].tolist()
        out, buf = [], []
        for i, s in zip(ids, slots):
            if s >= 0:
                if buf:
                    out.append(self.tok.decode(buf))
                    buf = []
                if s % self.k == 0:
                    out.append(f" <item:{int(batch.unique_items[s // self.k])}>")
            else:
                buf.append(i)
        if buf:
            out.append(self.tok.decode(buf))
        return "".join(out)
