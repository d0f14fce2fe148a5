"""The token-level assembly of the target optimisation (method.md §2 step 1, "Prompts").

For each request: one row per context template (the bare rewrite prompt first, then the
prefixed ones), each the prompt's ids followed by the target's ids except the last (teacher
forcing), and one KL row "{subject} is a" cut after the subject. :class:`Rows` holds them
right-padded, with the positions the loss reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..requests import EditRequest
from ..tokens import encode_prompt_targets, subject_last_index

__all__ = ["Rows", "build_rows", "recomputed_positions", "KL_TEMPLATE", "KIND_BARE", "KIND_PREFIXED", "KIND_KL"]

#: The KL prompt of method.md §2; its next-token distribution at the subject's last token is kept.
KL_TEMPLATE = "{} is a"
#: Row kinds: the bare rewrite prompt, a prefixed rewrite prompt, the KL prompt.
KIND_BARE, KIND_PREFIXED, KIND_KL = 0, 1, 2


@dataclass
class Rows:
    """All prompts of a set of requests, right-padded, with what the loss reads.

    R rows of at most T tokens: ``input_ids``/``attention_mask`` (R, T). ``req[r]``: request of
    row r; ``lookup[r]``: position of the subject's last token; ``kind[r]``: :data:`KIND_BARE`,
    :data:`KIND_PREFIXED` or :data:`KIND_KL`. Targets are flattened over all rows, (n_t,) each:
    ``t_row``/``t_pos``/``t_tok``: row, position whose logits predict the token, token id.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    req: torch.Tensor
    lookup: torch.Tensor
    kind: torch.Tensor
    t_row: torch.Tensor
    t_pos: torch.Tensor
    t_tok: torch.Tensor
    n_requests: int

    def subset(self, rows: torch.Tensor) -> Rows:
        """Rows ``rows`` (sorted indices), with target entries remapped."""
        remap = torch.full((len(self.req),), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        keep = remap[self.t_row] >= 0
        T = int(self.attention_mask[rows].sum(1).max())
        return Rows(
            self.input_ids[rows, :T],
            self.attention_mask[rows, :T],
            self.req[rows],
            self.lookup[rows],
            self.kind[rows],
            remap[self.t_row[keep]],
            self.t_pos[keep],
            self.t_tok[keep],
            self.n_requests,
        )


def build_rows(tok, requests: Sequence[EditRequest], templates: Sequence[str]) -> Rows:
    """Token-level assembly: prompt ids + target ids[:-1] (teacher forcing), one row per
    (request, template), then one KL row per request.

    Prompt and target ids come from :func:`pmetlab.tokens.encode_prompt_targets`, so each row is
    the joined text's encoding ``ids(prompt + " " + target)`` without its last token.
    """
    prompts = [ctx.format(r.prompt).format(r.subject) for r in requests for ctx in templates]
    encoded = iter(encode_prompt_targets(tok, prompts, [r.target_new for r in requests for _ in templates]))
    seqs: list[list[int]] = []
    req, lookup, kind, t_row, t_pos, t_tok = [], [], [], [], [], []
    for i, r in enumerate(requests):
        for j, ctx in enumerate(templates):
            template = ctx.format(r.prompt)
            ids, tgt = next(encoded)
            look = subject_last_index(tok, template, r.subject)
            if look >= len(ids):
                raise ValueError(
                    f"the subject {r.subject!r} of {template!r} merges with the target "
                    f"{r.target_new!r} when joined; end the prompt with text after the subject"
                )
            row = len(seqs)
            seqs.append(ids + tgt[:-1])
            req.append(i), lookup.append(look), kind.append(KIND_BARE if j == 0 else KIND_PREFIXED)
            for k, t in enumerate(tgt):
                t_row.append(row), t_pos.append(len(ids) - 1 + k), t_tok.append(t)
        # the KL logits are read at the subject's last token: later tokens cannot change them
        look = subject_last_index(tok, KL_TEMPLATE, r.subject)
        seqs.append(list(tok(KL_TEMPLATE.format(r.subject))["input_ids"])[: look + 1])
        req.append(i), lookup.append(look), kind.append(KIND_KL)
    T = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    L = torch.tensor
    return Rows(input_ids, mask, L(req), L(lookup), L(kind), L(t_row), L(t_pos), L(t_tok), len(requests))


def recomputed_positions(rows: Rows) -> int:
    """Positions the optimisation recomputes per step: those from each row's subject on (the
    earlier ones never see δ); what a chunk of requests is sized by."""
    return int((rows.attention_mask.sum(1) - rows.lookup).sum())
