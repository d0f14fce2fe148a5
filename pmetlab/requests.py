"""Edit requests: a validated, frozen (subject, relation prompt, new target) triple."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["EditRequest", "find_conflicts", "conflict_free_batches"]


def _norm(text: str) -> str:
    """The form two fields are compared in: NFKC-normalised, case-folded, runs of whitespace as
    one space, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def _invisible(text: str, allowed: str = "", offset: int = 0) -> str | None:
    """The first control or zero-width (format) character of ``text`` not in ``allowed``, described
    as ``U+200B ZERO WIDTH SPACE at position 3``; None when there is none."""
    for i, c in enumerate(text):
        if unicodedata.category(c) in ("Cc", "Cf") and c not in allowed:
            return f"U+{ord(c):04X} {unicodedata.name(c, 'control character')} at position {i + offset}"
    return None


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by `` target_new``.

    Attributes:
        prompt: template with exactly one ``{}`` where the subject goes, e.g. "{} plays the".
        subject: the subject string, e.g. "LeBron James".
        target_new: the new object, e.g. "football" (a leading space is added when tokenizing).
        target_true: the current object (used by the evaluation), optional; when given it must
            differ from ``target_new`` ignoring case and spacing (an edit to the current answer
            writes nothing and its CounterFact efficacy can never succeed).
        case_id: the record id in its dataset, optional.

    Normalised on construction: whitespace around ``subject`` moves into the prompt (the rendered
    text is unchanged, but the subject's last token is a token of the subject, not a space) and
    whitespace around the targets is dropped (a leading space is added when tokenizing). Refused:
    control or zero-width characters in any field (line breaks and tabs are allowed in the
    prompt), which look like nothing on screen yet change the tokens the edit is written to.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None

    def __post_init__(self) -> None:
        for fld in ("prompt", "subject", "target_new"):
            v = getattr(self, fld)
            if not isinstance(v, str):
                raise TypeError(f"EditRequest.{fld} must be a string, got {type(v).__name__}: {v!r}")
            if not v.strip():
                raise ValueError(f"EditRequest.{fld} must be non-empty, got {v!r}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise TypeError(
                f"EditRequest.target_true must be a string or None, got "
                f"{type(self.target_true).__name__}: {self.target_true!r}"
            )
        for fld in ("prompt", "subject", "target_new", "target_true"):
            v = getattr(self, fld)
            # surrounding whitespace (a trailing tab or line break) is normalised below, not refused
            bad = (
                None
                if v is None
                else _invisible(v.strip(), "\n\t" if fld == "prompt" else "", len(v) - len(v.lstrip()))
            )
            if bad is not None:
                raise ValueError(
                    f"EditRequest.{fld} contains an invisible character ({bad}) in {v!r}; remove it: it changes "
                    f"the tokens the edit is written to without showing on screen"
                )
        self._check_target_true()  # on the fields as given, so that its message shows them
        self._normalise_spaces()
        n = self.prompt.count("{}")
        if n != 1:
            raise ValueError(
                f"EditRequest.prompt must contain exactly one '{{}}' for the subject, found {n} "
                f"in {self.prompt!r}; e.g. '{{}} plays the sport of'"
            )
        stripped = self.prompt.replace("{}", "")
        if "{" in stripped or "}" in stripped:
            raise ValueError(f"EditRequest.prompt has a stray brace besides the one '{{}}': {self.prompt!r}")

    def _normalise_spaces(self) -> None:
        """Whitespace around the subject into the prompt, around the targets dropped (see the
        class docstring); the frozen fields are set once, here."""
        subject = self.subject.strip()
        if subject != self.subject and self.prompt.count("{}") == 1:
            lead = self.subject[: len(self.subject) - len(self.subject.lstrip())]
            trail = self.subject[len(self.subject.rstrip()) :]
            object.__setattr__(self, "prompt", self.prompt.replace("{}", lead + "{}" + trail))
            object.__setattr__(self, "subject", subject)
        for fld in ("target_new", "target_true"):
            v = getattr(self, fld)
            if v is not None and v != v.strip():
                object.__setattr__(self, fld, v.strip())

    def _check_target_true(self) -> None:
        """A given current object must be non-blank and differ from the new one: an edit that asks
        for the current answer writes nothing, and CounterFact's P(new) > P(true) can never hold."""
        if self.target_true is None:
            return
        if not self.target_true.strip():
            raise ValueError(
                f"EditRequest.target_true must be non-empty or None, got {self.target_true!r}; "
                f"pass target_true=None when the current object is unknown"
            )
        if _norm(self.target_true) == _norm(self.target_new):
            raise ValueError(
                f"EditRequest.target_new {self.target_new!r} is the current object target_true "
                f"{self.target_true!r} (compared ignoring case and spacing): the edit would ask for the answer "
                f"the model is meant to give already, and CounterFact's efficacy P(new) > P(true) could "
                f"never succeed; choose a different target_new"
            )

    @property
    def conflict_key(self) -> tuple[str, str]:
        """(subject, prompt), ignoring case and spacing: two requests with the same key and
        different targets ask for two objects of one fact (see :func:`find_conflicts`)."""
        return _norm(self.subject), _norm(self.prompt)

    @property
    def text(self) -> str:
        """The rendered prompt, subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditRequest:
        allowed = {"prompt", "subject", "target_new", "target_true", "case_id"}
        extra = set(d) - allowed
        if extra:
            raise KeyError(f"unknown EditRequest fields {sorted(extra)}; expected {sorted(allowed)}")
        return cls(**d)

    @classmethod
    def from_counterfact(cls, record: Mapping[str, Any]) -> EditRequest:
        """From a CounterFact record (``requested_rewrite`` with ``{}`` in its prompt)."""
        try:
            rw = record["requested_rewrite"]
            fields = dict(
                prompt=rw["prompt"],
                subject=rw["subject"],
                target_new=rw["target_new"]["str"],
                target_true=rw["target_true"]["str"],
                case_id=record.get("case_id"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise KeyError(
                f"not a CounterFact record (missing or malformed {exc}); expected keys case_id, "
                f"requested_rewrite{{prompt, subject, target_new{{str}}, target_true{{str}}}}"
            ) from None
        # field validation happens outside the try, so its TypeError/ValueError keeps its own message
        return cls(**fields)

    @classmethod
    def from_zsre(cls, record: Mapping[str, Any]) -> EditRequest:
        """From a zsRE record: the question with the subject replaced by ``{}``, target = answers[0]."""
        try:
            subject, src, answers = record["subject"], record["src"], record["answers"]
        except (KeyError, TypeError) as exc:
            raise KeyError(f"not a zsRE record (missing {exc}); expected keys subject, src, answers") from None
        for name, v in (("subject", subject), ("src", src)):
            if not isinstance(v, str):
                raise TypeError(f"zsRE record: {name} must be a string, got {type(v).__name__}: {v!r}")
        if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
            raise TypeError(
                f"zsRE record for {subject!r}: answers must be a list of strings, got "
                f"{type(answers).__name__}: {answers!r}"
            )
        if not answers:
            raise ValueError(f"zsRE record for {subject!r} has no answers")
        subject = subject.strip()
        if subject and subject not in src:  # an empty subject is reported by EditRequest
            raise ValueError(f"zsRE record: subject {subject!r} does not occur in question {src!r}")
        # the first occurrence as a whole word: inside a longer word ("Rome" in "Romeo") the subject's
        # last token would be a piece of another word, and the edit would be written to it
        whole = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", src) if subject else None
        if subject and whole is None:
            raise ValueError(
                f"zsRE record {record.get('case_id', '')!s}: subject {subject!r} occurs in question {src!r} only "
                f"inside a longer word; fix the record's subject (or question)"
            )
        prompt = src[: whole.start()] + "{}" + src[whole.end() :] if whole else src.replace(subject, "{}", 1)
        return cls(
            prompt=prompt, subject=subject, target_new=answers[0], target_true=None, case_id=record.get("case_id")
        )


def find_conflicts(requests: Sequence[EditRequest]) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, of requests with the same subject and prompt but
    different targets (all compared ignoring case and spacing), each later request paired with
    the first one of its key. Identical duplicates are no conflict."""
    first: dict[tuple[str, str], tuple[int, str]] = {}
    out: list[tuple[int, int]] = []
    for j, r in enumerate(requests):
        i, target = first.setdefault(r.conflict_key, (j, _norm(r.target_new)))
        if i != j and target != _norm(r.target_new):
            out.append((i, j))
    return out


def conflict_free_batches(requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
    """Split ``requests`` into as few batches as possible with no conflict inside a batch
    (:func:`find_conflicts`): the k-th distinct target of a (subject, prompt) goes into batch k,
    duplicates with their target; the order of the input is kept within each batch.

    Apply the batches one after another (e.g. ``mode="sequential"`` in a run): each later batch
    then overwrites the earlier object of the conflicting fact."""
    targets: dict[tuple[str, str], list[str]] = {}
    batches: list[list[EditRequest]] = []
    for r in requests:
        seen = targets.setdefault(r.conflict_key, [])
        if _norm(r.target_new) not in seen:
            seen.append(_norm(r.target_new))
        k = seen.index(_norm(r.target_new))
        batches += [[] for _ in range(k + 1 - len(batches))]
        batches[k].append(r)
    return batches
