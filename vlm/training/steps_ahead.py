"""The next step's samples, prepared in a background thread while this step trains.

With `data.num_workers=0` the main process reads and encodes every step's samples. A step on a GPU leaves the
host's cores idle while its kernels run, so a thread encodes the next step meanwhile (`data.encode_ahead`, on by
default on accelerators). Not on a CPU by default: there the step's kernels keep every core busy and the encoding
is Python that needs the GIL, so the thread only moves the same CPU time around and adds contention. The default
experiment on 2 cores (0.45 ms a sample, 32 a step, steps of 0.13 s) went from 13% data wait to 0.1% with it,
but its runs took 5% longer (alternating 400-step runs, 64.0 s against 60.7 s on average).

The next step is prepared only inside `meanwhile()`, which the trainer wraps around the forward/backward of a
step, and is finished when the block ends. Evaluation, generation and checkpoint saves therefore never run beside
it: they use the same tokenizer (a Rust tokenizer used from two threads at once fails with 'Already borrowed', and
our encoding sets a flag on it), and a checkpoint must see the data position of the step it follows.
With workers, the thread only takes the next step from the DataLoader's queue.
"""

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager


class StepsAhead:
    """An iterator over `steps` that fetches the next item in a background thread during a `meanwhile()` block;
    not `enabled`, a plain iterator whose blocks do nothing."""

    def __init__(self, steps: Iterator, enabled: bool = True):
        self._steps = steps
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-next-step") if enabled else None
        self._next: Future | None = None
        self.waited_s = 0.0  # how long the end of the last `meanwhile()` block waited for the next step

    def __iter__(self) -> "StepsAhead":
        return self

    def __next__(self):
        if self._next is None:
            return next(self._steps)
        ahead, self._next = self._next, None
        return ahead.result()  # an error raised while preparing it (StopIteration too) is raised here

    @contextmanager
    def meanwhile(self):
        """Prepares the next item during the block; the block ends once it is ready."""
        if self._thread is None:
            yield
            return
        self._next = self._thread.submit(next, self._steps)
        try:
            yield
        finally:
            start = time.perf_counter()
            self._next.exception()  # waits; the error, if any, is raised by the next `next()`
            self.waited_s = time.perf_counter() - start
