"""A run's time budget (cfg.max_time): the seconds of it used, and each step's place in it.

What the budget counts: the training steps, from the start of the first one (the setup before it,
preparing the data and building the model, comes on top) to the end of the last, with the clock
paused for each evaluation and what goes with it (checkpoints, the sample). A resumed run goes on
from the seconds its last/ checkpoint recorded, so the budget is the run's, not the process's.

How a step finds its learning rate: the fraction of the budget it will have used when it ends,
estimated as the seconds used so far plus the previous step's duration. The step whose estimate
reaches the budget is the last one and runs at the schedule's end (fraction 1, the final learning
rate); a step that runs past the budget without being expected to (one much slower than the one
before) ends the run too. Both numbers are read from the clock only at step boundaries and saved with
last/, so the step -> learning-rate mapping is a function of the clock's readings. "Exact resume"
therefore means: given the same readings, a resumed run takes the steps and losses of the
uninterrupted one bit for bit (tests inject a clock whose readings are deterministic). With the wall
clock the readings of two runs differ, and so do their step counts and schedules, by design.
"""

from __future__ import annotations

import time
from typing import Any, Callable

# A clock: seconds from a fixed origin, monotonic (time.perf_counter is the trainer's).
Clock = Callable[[], float]


class Budget:
    """The seconds of cfg.max_time used so far, read from `clock` at each step's end.

    used_s, last_step_s: what a resumed run's checkpoint recorded (state_dict), 0 for a new run."""

    def __init__(self, max_time: float, clock: Clock | None = None, used_s: float = 0.0,
                 last_step_s: float = 0.0) -> None:
        self.max_time, self.clock = max_time, clock or time.perf_counter
        self.used_s, self.last_step_s = used_s, last_step_s
        self._mark = self.clock()  # the start of the step to come

    @classmethod
    def resumed(cls, max_time: float, clock: Clock | None, state: dict[str, Any] | None) -> "Budget":
        """The budget of a run starting from train state `state` (None: a new run). A checkpoint of a
        run without a budget has used none of it."""
        state = state or {}
        return cls(max_time, clock, float(state.get("budget_used_s", 0.0)), float(state.get("budget_last_step_s", 0.0)))

    def plan(self) -> tuple[float, bool]:
        """(the fraction of the budget the next step is expected to end at, in [0, 1]; whether it is the last)."""
        expected = (self.used_s + self.last_step_s) / self.max_time
        return min(expected, 1.0), expected >= 1.0

    def step_done(self) -> bool:
        """Count the step just ended; True when the budget is used up."""
        now = self.clock()
        self.last_step_s, self._mark = now - self._mark, now
        self.used_s += self.last_step_s
        return self.used_s >= self.max_time

    def resume_clock(self) -> None:
        """End a pause (an evaluation): the time since the last step's end is not counted."""
        self._mark = self.clock()

    def done_s(self, last: bool) -> float:
        """The seconds of budget a checkpoint says the run has done: all of it after its last step."""
        return max(self.used_s, self.max_time) if last else self.used_s

    def state_dict(self) -> dict[str, float]:
        return {"budget_used_s": self.used_s, "budget_last_step_s": self.last_step_s}
