"""Edit requests: a validated, frozen (subject, relation prompt, new target) triple."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["EditRequest"]


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by `` target_new``.

    Attributes:
        prompt: template with exactly one ``{}`` where the subject goes, e.g. "{} plays the".
        subject: the subject string, e.g. "LeBron James".
        target_new: the new object, e.g. "football" (a leading space is added when tokenizing).
        target_true: the current object (used by the evaluation), optional.
        case_id: the record id in its dataset, optional.
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
        n = self.prompt.count("{}")
        if n != 1:
            raise ValueError(
                f"EditRequest.prompt must contain exactly one '{{}}' for the subject, found {n} "
                f"in {self.prompt!r}; e.g. '{{}} plays the sport of'"
            )
        stripped = self.prompt.replace("{}", "")
        if "{" in stripped or "}" in stripped:
            raise ValueError(f"EditRequest.prompt has a stray brace besides the one '{{}}': {self.prompt!r}")

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
        if subject.strip() and subject not in src:  # an empty subject is reported by EditRequest
            raise ValueError(f"zsRE record: subject {subject!r} does not occur in question {src!r}")
        prompt = src.replace(subject, "{}", 1)
        return cls(
            prompt=prompt, subject=subject, target_new=answers[0], target_true=None, case_id=record.get("case_id")
        )
