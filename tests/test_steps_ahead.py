"""The next step is prepared in a background thread during the step, and only then."""

import threading
import time

import pytest

from vlm.training.steps_ahead import StepsAhead


def _steps(log: list, fail_at: int | None = None, gate: threading.Event | None = None):
    """Steps 0, 1, ...; each step after the first waits for `gate` (when given) before it is made."""
    step = 0
    while True:
        if gate is not None and step > 0:
            assert gate.wait(timeout=30)
            time.sleep(0.01)  # a step takes a while: the block's end must wait for it
        if step == fail_at:
            raise ValueError(f"step {step} is unreadable")
        log.append((step, threading.current_thread().name))
        yield step
        step += 1


def test_the_next_step_is_prepared_in_the_background_during_the_block_and_ready_when_it_ends():
    log, gate = [], threading.Event()
    ahead = StepsAhead(_steps(log, gate=gate))
    assert next(ahead) == 0  # nothing prepared yet: read here
    with ahead.meanwhile():
        assert len(log) == 1  # step 1 is held at the gate: the block does not wait for it at its start
        gate.set()
    assert log[1][0] == 1 and log[1][1].startswith("vlm-next-step")  # made in the background thread
    assert ahead.waited_s > 0.0  # the block's end waited for step 1
    assert next(ahead) == 1
    assert len(log) == 2  # outside a block nothing is read ahead: evaluation and saving run alone
    assert next(ahead) == 2 and log[2][1] == threading.current_thread().name


def test_an_error_while_preparing_is_raised_by_the_next_step_not_inside_the_block():
    ahead = StepsAhead(_steps([], fail_at=1))
    next(ahead)
    with ahead.meanwhile():
        pass
    with pytest.raises(ValueError, match="step 1 is unreadable"):
        next(ahead)


def test_not_enabled_the_block_reads_nothing_ahead():
    log = []
    ahead = StepsAhead(_steps(log), enabled=False)  # the trainer's choice on a CPU (data.encode_ahead=null)
    next(ahead)
    with ahead.meanwhile():
        pass
    assert len(log) == 1 and next(ahead) == 1 and log[1][1] == threading.current_thread().name
