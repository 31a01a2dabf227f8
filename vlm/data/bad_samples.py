"""Bad samples: the reasons a record cannot be trained on, and the tally that skips and counts them.

A dataset, the image loader or the processor raises `BadSample(reason, ...)`; `EncodedDataset` turns it
into a `SkippedSample` (plain data, safe to send from DataLoader workers); the trainer hands those to a
`SkipTally`, which counts each bad sample once per reason, logs each reason once, stops the run under
`data.on_error=raise` or when more than `data.max_skip_fraction` of the samples drawn were bad, and
reports the counts. Whether a sample is bad depends on the sample alone, never on the micro-batch or
process it lands in, so skipping keeps every equivalence (accumulation, back-off, resume) intact.
"""

import logging
from dataclasses import dataclass

from vlm.errors import UserError

log = logging.getLogger(__name__)

# reason -> TROUBLESHOOTING.md anchor
REASONS = {
    "image_missing": "missing-or-unreadable-image",
    "image_empty": "missing-or-unreadable-image",
    "image_truncated": "missing-or-unreadable-image",
    "image_not_an_image": "missing-or-unreadable-image",
    "image_too_large": "missing-or-unreadable-image",
    "image_outside_root": "image-path-outside-image_root",
    "marker_mismatch": "placeholder-count-mismatch",
    "malformed_record": "malformed-record",
    "nothing_to_learn": "samples-with-nothing-to-learn",
    "answer_truncated": "samples-with-nothing-to-learn",
    "truncation_cuts_image": "truncation-cuts-image-tokens",
}
SHOWN_IDS = 5  # sample ids listed per reason in logs and summaries
FIRST_DRAWS = 16  # every one of the first this many samples drawn bad: the data or its settings are wrong


def sample_label(index: int, raw: dict | None = None) -> str:
    """How messages name a sample: its index in the split, and the record's own id when it has one."""
    record_id = raw.get("id") if isinstance(raw, dict) else None
    return f"{index} (id {record_id!r})" if record_id is not None else str(index)


class BadSample(UserError, ValueError):
    """A sample that cannot be trained on; `reason` is a key of REASONS. Raised out of a run only with
    data.on_error=raise (the run fails on its data: exit 1)."""

    exit_code = 1

    def __init__(self, reason: str, detail: str, sample: str = "?"):
        if reason not in REASONS:
            raise KeyError(f"unknown bad-sample reason {reason!r}")
        self.reason, self.detail, self.sample = reason, detail, sample
        super().__init__(f"sample {sample}: {detail} [{reason}]. See TROUBLESHOOTING.md#{REASONS[reason]}.")

    def __reduce__(self):  # exceptions pickle through `args`; keep every field
        return BadSample, (self.reason, self.detail, self.sample)

    def for_sample(self, sample: str) -> "BadSample":
        """The same error naming `sample` (raised where the sample's label was not known)."""
        return BadSample(self.reason, self.detail, sample)


@dataclass
class SkippedSample:
    """Stands in for a bad sample in a step's list; the trainer leaves it out of every micro-batch."""

    index: int
    label: str
    reason: str
    detail: str

    @classmethod
    def from_error(cls, index: int, err: BadSample) -> "SkippedSample":
        return cls(index, err.sample, err.reason, err.detail)

    def error(self) -> BadSample:
        return BadSample(self.reason, self.detail, self.label)


class TooManyBadSamplesError(UserError, RuntimeError):
    exit_code = 1


class SkipTally:
    """Distinct bad samples per reason, and the share of drawn samples that were bad (over all processes)."""

    def __init__(self, on_error: str = "skip", max_fraction: float = 0.05, judge_after: int = 256):
        self.on_error, self.max_fraction, self.judge_after = on_error, max_fraction, judge_after
        self.bad: dict[str, dict[int, str]] = {}  # reason -> {index: label}
        self.first_detail: dict[str, str] = {}  # reason -> what was wrong with its first sample
        self.draws = self.bad_draws = 0

    def record(self, skipped: list[SkippedSample]) -> None:
        """This process's skipped samples of one step: raise (on_error=raise), or count and log new reasons."""
        for sample in skipped:
            if self.on_error == "raise":
                raise sample.error()
            seen = self.bad.setdefault(sample.reason, {})
            self.first_detail.setdefault(sample.reason, f"sample {sample.label}: {sample.detail}")
            if not seen:
                log.warning(
                    "%s Skipped (data.on_error=skip); further '%s' samples are counted, and listed at the end.",
                    sample.error(), sample.reason,
                )  # fmt: skip
            seen[sample.index] = sample.label

    def count_draws(self, draws: int, bad_draws: int) -> None:
        """Samples drawn in one step and how many were bad, summed over processes (so every rank agrees)."""
        self.draws += int(draws)
        self.bad_draws += int(bad_draws)
        if self.draws >= FIRST_DRAWS:
            self.check_something_usable()
        if self.draws >= self.judge_after and self.bad_draws > self.max_fraction * self.draws:
            raise TooManyBadSamplesError(
                f"{self.bad_draws} of the {self.draws} samples drawn so far were bad ({self.bad_draws / self.draws:.1%}"
                f" > data.max_skip_fraction={self.max_fraction}): {self.describe()}. Clean the data (python -m "
                "vlm.check_data with the same overrides lists every bad record) or raise data.max_skip_fraction. "
                "See TROUBLESHOOTING.md#too-many-bad-samples."
            )

    def check_something_usable(self) -> None:
        """Stop a run in which every sample drawn so far was bad: it has trained on nothing, and never will with
        these settings. Checked after the first FIRST_DRAWS draws and at the end of a run of any length. The
        counts are summed over processes, so every process stops alike."""
        if self.draws == 0 or self.bad_draws < self.draws:
            return
        hint = ""
        if set(self.bad) == {"image_missing"}:  # a wrong image root, most likely: say which root, which paths
            hint = (
                f" Every one is a missing image; the first: {self.first_detail['image_missing']}. Relative image "
                "paths resolve against data.dataset.image_root (default: the data file's folder): set it to the "
                "folder the records' paths are relative to."
            )
        raise TooManyBadSamplesError(
            f"every one of the {self.draws} samples drawn was bad, so nothing was trained on: {self.describe()}.{hint} "
            "python -m vlm.check_data with the same overrides lists every bad record. "
            "See TROUBLESHOOTING.md#too-many-bad-samples."
        )

    def counts(self) -> dict[str, int]:
        return {reason: len(seen) for reason, seen in sorted(self.bad.items())}

    def describe(self) -> str:
        """'reason: count (first ids ...)' for every reason, for logs and errors."""
        parts = []
        for reason, seen in sorted(self.bad.items()):
            shown = ", ".join(list(seen.values())[:SHOWN_IDS]) + (", ..." if len(seen) > SHOWN_IDS else "")
            parts.append(f"{reason}: {len(seen)} (samples {shown})")
        return "; ".join(parts) if parts else "none"

    def state_dict(self) -> dict:
        bad = {reason: {str(i): label for i, label in seen.items()} for reason, seen in self.bad.items()}
        return {"bad": bad, "draws": self.draws, "bad_draws": self.bad_draws}

    def load_state_dict(self, state: dict) -> None:
        self.bad = {}
        self.merge([state])
        self.draws, self.bad_draws = state["draws"], state["bad_draws"]

    def merge(self, states: list[dict]) -> None:
        """Union of other processes' bad samples (each process saw its own share of every step)."""
        for state in states:
            for reason, seen in state["bad"].items():  # JSON keys are strings
                self.bad.setdefault(reason, {}).update({int(i): label for i, label in seen.items()})
