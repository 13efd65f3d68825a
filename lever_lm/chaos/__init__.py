"""Chaos runs: resumable jobs killed with SIGKILL at random moments must still write an
uninterrupted run's bytes and leave nothing behind (`benchmarks/chaos.py`, `tests/test_chaos.py`)."""

from lever_lm.chaos.driver import ChaosError, ChaosReport, Kill, Round, plan_rounds, run_chaos
from lever_lm.chaos.jobs import (
    Job,
    Output,
    beam_data_flags,
    beam_data_job,
    demo_generator_flags,
    generator_flags,
    generator_job,
    json_except,
    local_ray_cluster,
)

__all__ = [
    "ChaosError",
    "ChaosReport",
    "Job",
    "Kill",
    "Output",
    "Round",
    "beam_data_flags",
    "beam_data_job",
    "demo_generator_flags",
    "generator_flags",
    "generator_job",
    "json_except",
    "local_ray_cluster",
    "plan_rounds",
    "run_chaos",
]
