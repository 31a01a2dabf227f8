"""Load check: read and encode every record of a dataset before spending GPU hours on it.

    python -m vlm.check_data +experiment=llava_tiny data.dataset.path=data.json data.dataset.image_root=images/

Takes the same Hydra overrides as train.py, builds the same tokenizer, model and processor, and encodes
every training and validation record exactly as training would (images decoded, conversation rendered,
truncation checked). Prints bad records by reason (with the first ids), token-length percentiles, images
per sample and records/s. Exit status: 0 when every record is good, 1 when some are bad, 2 when the data
or config cannot be opened at all.
"""

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlm.build import build_components, validate_config
from vlm.cli import command
from vlm.config import ConfigError, compose_config
from vlm.data.bad_samples import SkippedSample, SkipTally
from vlm.data.formats import EncodedDataset
from vlm.data.processing import SampleProcessor
from vlm.data.transfer import StepSamples


@dataclass
class SplitReport:
    records: int = 0
    bad: SkipTally = field(default_factory=lambda: SkipTally(max_fraction=1.0))
    token_lengths: list[int] = field(default_factory=list)
    images_per_sample: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def lines(self, name: str) -> list[str]:
        lengths = np.array(self.token_lengths or [0])
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        images = ", ".join(f"{k}: {v}" for k, v in sorted(self.images_per_sample.items()))
        return [
            f"{name}: {self.records} records, {sum(self.bad.counts().values())} bad, "
            f"{self.records / max(self.seconds, 1e-9):.0f} records/s",
            f"  bad by reason: {self.bad.describe()}",
            f"  tokens per sample: p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {lengths.max()}",
            f"  images per sample: {images or 'none'}",
        ]


def check_split(dataset: Dataset, processor: SampleProcessor, num_workers: int, name: str = "") -> SplitReport:
    """Encode every sample of `dataset` as training would; count the bad ones by reason."""
    report, start = SplitReport(records=len(dataset)), time.perf_counter()
    encoded = EncodedDataset(dataset, processor)
    loader = DataLoader(encoded, batch_size=32, collate_fn=StepSamples.of, num_workers=num_workers)
    for chunk in tqdm(loader, desc=f"check {name}", total=len(loader), dynamic_ncols=True):
        batch = chunk.samples()
        report.bad.record([s for s in batch if isinstance(s, SkippedSample)])
        for sample in batch:
            if not isinstance(sample, SkippedSample):
                report.token_lengths.append(len(sample.input_ids))
                report.images_per_sample[sample.num_images] += 1
    report.seconds = time.perf_counter() - start
    return report


@command(__doc__)
def main(overrides: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run = validate_config(compose_config(overrides))
        if getattr(run.data.dataset, "streaming", False):
            raise ConfigError(
                "the check reads every record by position, which a stream does not offer; run it with "
                "data.dataset.streaming=false (on the file itself, or on a sample of it)"
            )
        parts = build_components(run)
    except (HydraException, OmegaConfBaseException, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reports = {split: check_split(dataset, parts.processor, parts.data.num_workers, split)
               for split, dataset in (("train", parts.train_set), ("val", parts.val_set))}  # fmt: skip
    for split, report in reports.items():
        print("\n".join(report.lines(split)))
    return 1 if any(r.bad.counts() for r in reports.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
