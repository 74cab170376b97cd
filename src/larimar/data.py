"""Datasets: text blocks for training and knowledge-editing benchmarks.

(Work in progress: loaders for CounterFact / ZsRE are added here.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EditRequest:
    """One fact to write, in the field's vocabulary (ROME / EasyEdit).

    Attributes:
        prompt: template with ``{}`` where the subject goes, e.g. ``"The capital of {} is"``.
        subject: the subject, e.g. ``"France"``.
        target_new: the new object, e.g. ``"Rome"`` (no leading space).
        target_true: the object the unedited model knows, if any.
        paraphrase_prompts: rephrasings of the full prompt (subject filled in).
        neighborhood_prompts: prompts about other subjects whose answer is ``target_true``.
        case_id: the record id in its source file.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    case_id: int | str | None = None

    @property
    def full_prompt(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def sentence(self) -> str:
        """The fact as one sentence: prompt with subject, a space, the new target."""
        return f"{self.full_prompt} {self.target_new}"
