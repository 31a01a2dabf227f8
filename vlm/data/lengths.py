"""Token lengths of every training sample, for grouped batching: computed once at start-up, images not decoded.

Each length is the training encoding's (`SampleProcessor.token_length`: the chat format with the image runs,
capped at data.max_length), read in DataLoader workers when there are any, with a progress bar. A record that
cannot be read counts as length 0: it is skipped and counted when its step draws it, as in any batching mode.
"""

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlm.data.bad_samples import BadSample
from vlm.data.processing import SampleProcessor


class _TokenLengths(Dataset):
    def __init__(self, raw: Dataset, processor: SampleProcessor):
        self.raw, self.processor = raw, processor

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> int:
        try:
            return self.processor.token_length(self.raw[index], index)
        except BadSample:
            return 0


def sample_lengths(
    raw: Dataset, processor: SampleProcessor, num_workers: int = 0, show_progress: bool = True
) -> list[int]:
    loader = DataLoader(_TokenLengths(raw, processor), batch_size=512, num_workers=num_workers, collate_fn=list)
    lengths: list[int] = []
    with tqdm(
        total=len(raw), desc="token lengths (data.batching=grouped)", unit="samples", disable=not show_progress
    ) as bar:
        for chunk in loader:
            lengths += chunk
            bar.update(len(chunk))
    return lengths
