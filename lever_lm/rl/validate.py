"""The validation stage: is this RL data file a run's real output, and is it worth training on?

    python -m lever_lm.rl.validate --rl_data RL.json --beam_data B.json --train_* ... \\
        --metrics M.json --breakdown B.json --plots DIR [--audit N]

1. the data file is read (a file of the layout of earlier versions is refused in one line), the
   meta sidecar is read (required; `lever_lm.rl.meta`), and the data file's sha256 and the
   inputs are checked against it (`lever_lm.rl.provenance`);
2. the file is checked against the format's rules and everything the inputs let us recompute
   (`lever_lm.rl.checks`), its counts against the sidecar's, each unscorable query's image, and
   every entry against the run's journal when it is there (`lever_lm.rl.provenance`);
3. with `--audit N`, the run's VQA model is re-run on N random candidates (`lever_lm.rl.audit`);
4. the metrics, the breakdown and the plots are written (`lever_lm.rl.metrics`, `lever_lm.rl.plots`).

Any failure is one `error:` line and exit status 2, and nothing is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lever_lm.data.beam_data import load_beam_data
from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.errors import InputError
from lever_lm.io import atomic_output
from lever_lm.rl import provenance
from lever_lm.rl.audit import DEFAULT_TOLERANCE, AuditSettings, run_audit
from lever_lm.rl.checks import expectations_for, load_rl_data, raise_problems, validate_rl_data
from lever_lm.rl.meta import read_meta
from lever_lm.rl.metrics import compute_breakdown, compute_metrics
from lever_lm.rl.plots import plot_data, write_plots

DEFAULT_MAX_FAILED_SHARE = 0.05


@dataclass(frozen=True)
class ValidationOutputs:
    metrics: Path
    breakdown: Path
    plots: Path


@dataclass(frozen=True)
class ValidationReport:
    """What validation found: the headline metrics, whether the journal was compared, the audit."""

    metrics: dict
    journal: str
    audit: dict | None = None


def run_validation(
    rl_path: Path,
    beam_data_path: Path,
    dataset_paths: DatasetPaths,
    outputs: ValidationOutputs,
    val_ann_path: Path | None = None,
    max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
    sampler_cache: Path | None = None,
    audit: AuditSettings | None = None,
) -> ValidationReport:
    """Check the RL file and its provenance, audit it if asked, then write metrics, the breakdown and plots."""
    data = load_rl_data(rl_path)  # first: a file of an earlier layout is told so, whatever its sidecar
    meta = read_meta(rl_path)
    provenance.check_data_digest(rl_path, meta)
    provenance.check_inputs(meta, beam_data_path, dataset_paths, val_ann_path)
    dataset = dataset_paths.load()
    beam = load_beam_data(beam_data_path, len(dataset))
    expected = expectations_for(dataset, beam.query_ids, meta, val_ann_path, max_failed_share, sampler_cache)
    validate_rl_data(rl_path, data, expected)
    journal_problems, journal = provenance.journal_problems(data, meta, beam.query_ids)
    raise_problems(
        rl_path,
        [
            *provenance.count_problems(data, meta),
            *provenance.unscorable_problems(data, meta, dataset),
            *journal_problems,
        ],
    )
    audited = run_audit(rl_path, data, meta, dataset, audit) if audit and audit.candidates > 0 else None
    metrics = compute_metrics(data)
    breakdown = compute_breakdown(data, meta) | {"provenance": {"journal": journal, "audit": audited}}
    _write_json(outputs.metrics, metrics)
    _write_json(outputs.breakdown, breakdown)
    write_plots(plot_data(data), outputs.plots)
    return ValidationReport(metrics, journal, audited)


def _write_json(path: Path, value: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def summary_line(report: ValidationReport) -> str:
    metrics, audit = report.metrics, report.audit
    line = (
        f"valid: {metrics['queries']} queries, {metrics['candidates']} candidates; accuracy {metrics['accuracy']:.3f}, "
        f"non-flat groups {metrics['non_flat']:.1%}; journal: {report.journal}"
    )
    if audit is not None:
        line += (
            f"; audit: the VQA model re-run on {audit['candidates']} of {audit['of']} candidates "
            f"(seed {audit['seed']}), {audit['answers_differ']} answers and {audit['accuracies_differ']} accuracies differ"
        )
    return line


def main(argv: list[str] | None = None) -> None:
    """`python -m lever_lm.rl.validate --rl_data RL.json --beam_data B.json --train_* ... --metrics M.json ...`."""
    import argparse

    from lever_lm.data.dataset_paths import add_dataset_arguments, dataset_paths_from_args
    from lever_lm.errors import exit_on_input_error

    parser = argparse.ArgumentParser(description="Validate an RL data file and write its metrics and plots.")
    parser.add_argument("--rl_data", type=Path, required=True, help="the final RL data JSON (its .meta.json beside it)")
    parser.add_argument("--beam_data", type=Path, required=True, help="the beam data JSON it was generated from")
    add_dataset_arguments(parser)
    parser.add_argument("--val_ann_path", type=Path, help="the scoring annotations the run was given, if any")
    parser.add_argument(
        "--sampler_cache",
        type=Path,
        help="the sampler cache the run read (per-query pools): pools are checked against it",
    )
    parser.add_argument("--metrics", type=Path, required=True, help="headline metrics JSON to write")
    parser.add_argument("--breakdown", type=Path, required=True, help="per-method / per-temperature metrics JSON")
    parser.add_argument("--plots", type=Path, required=True, help="directory for plot CSVs and PNGs")
    parser.add_argument(
        "--max_failed_share",
        type=float,
        default=DEFAULT_MAX_FAILED_SHARE,
        help="fail when more than this share of the evaluations failed (default: %(default)s)",
    )
    parser.add_argument(
        "--audit",
        type=int,
        default=0,
        metavar="N",
        help="re-run the run's VQA model on N random candidates and compare with the file (0: no audit)",
    )
    parser.add_argument("--audit_seed", type=int, default=0, help="seed of the audit's draw (default: %(default)s)")
    parser.add_argument("--device", help="torch device of the audit (default: the run's)")
    parser.add_argument(
        "--audit_tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="share of audited candidates that may differ (near-ties on a GPU in bf16) (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    with exit_on_input_error():
        if not 0.0 <= args.max_failed_share <= 1.0 or math.isnan(args.max_failed_share):
            raise InputError(None, f"--max_failed_share must be in [0, 1], got {args.max_failed_share}")
        if args.audit < 0 or not 0.0 <= args.audit_tolerance < 1.0:
            raise InputError(None, "--audit must be >= 0 and --audit_tolerance in [0, 1)")
        outputs = ValidationOutputs(args.metrics, args.breakdown, args.plots)
        audit = AuditSettings(args.audit, args.audit_seed, args.device, args.audit_tolerance)
        report = run_validation(
            args.rl_data,
            args.beam_data,
            dataset_paths_from_args(args),
            outputs,
            args.val_ann_path,
            args.max_failed_share,
            args.sampler_cache,
            audit,
        )
    print(summary_line(report))


if __name__ == "__main__":
    main()
