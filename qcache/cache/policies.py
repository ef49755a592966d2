"""Older home of the step policies; they live in schedule.py now (with RCS and the static schedules)."""

from .schedule import AllSteps, FixedSchedule, RelationalSchedule, StepPolicy, interval_full_steps, uniform_full_steps  # noqa: F401
