"""The cache runtime: a step clock, a slot store and the installed branch policy (see runtime.py)."""

from .clock import StepClock
from .policies import BranchPolicy, PerSamplePolicy, PlanPolicy, build_plan
from .runtime import CacheRuntime, PerSampleSteps
from .slots import SlotStore

__all__ = ["BranchPolicy", "CacheRuntime", "PerSamplePolicy", "PerSampleSteps", "PlanPolicy", "SlotStore",
           "StepClock", "build_plan"]
