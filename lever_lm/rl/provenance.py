"""Is the data file the one a run wrote? Provenance checks on top of the format's rules.

The meta sidecar (`lever_lm.rl.meta`) is required, and holds the fingerprint of the run and the
sha256 of the data file it wrote. Validation checks, in this order:

1. the data file's sha256 is the sidecar's (a sidecar from another run beside the data -- e.g.
   after `dvc checkout` -- or an edited file is caught here; the fingerprint is checked against
   the sidecar's own settings when the sidecar is read);
2. the inputs given to validation are the ones the run read, by content (beam data, training
   questions and annotations, scoring annotations);
3. the sidecar's counts (queries, candidates, failures, accuracy by method) are those of the file,
   counted with the generator's own `records.MethodTotals`;
4. each query the sidecar lists as unscorable really is: its image cannot be read;
5. when the run's journals are there, every entry of the file is the latest checksummed journal
   line of its query, in journals of the sidecar's fingerprint (read with `lever_lm.rl.journal`'s
   own reader, which checks every line), and every unscorable query is journaled as such.

None of this can tell a file from a sidecar forged together with it; re-running the VQA model on
some candidates (`lever_lm.rl.audit`) can.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.data.vqa import VQADataset
from lever_lm.digests import file_digest
from lever_lm.errors import InputError
from lever_lm.rl.blocks import shard_of
from lever_lm.rl.journal import JournalSpec, read_entry
from lever_lm.rl.meta import RunMeta, meta_path_for
from lever_lm.rl.output import collect_journal_index
from lever_lm.rl.records import MethodTotals
from lever_lm.vqa.images import UnreadableImage, read_rgb

log = logging.getLogger(__name__)


def check_data_digest(rl_path: Path, meta: RunMeta) -> None:
    """The data file is the one the sidecar describes (its bytes' sha256)."""
    digest = hashlib.sha256()
    with open(rl_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != meta.data_sha256:
        raise InputError(
            rl_path,
            f"its sha256 is not the one its meta sidecar {meta_path_for(rl_path).name} records: the file was edited, "
            "or the sidecar belongs to another run (restore both from the same run, or regenerate)",
        )


def check_inputs(meta: RunMeta, beam_data: Path, dataset_paths: DatasetPaths, val_ann_path: Path | None) -> None:
    """The inputs validation reads are the ones the run read (by content, as its fingerprint has them)."""
    given = {
        "beam_data": beam_data,
        "train_questions": dataset_paths.train_ques_path,
        "train_annotations": dataset_paths.train_ann_path,
        "val_annotations": val_ann_path,
    }
    for name, path in given.items():
        recorded = meta.settings.inputs.get(name)
        if path is None and recorded is None:
            continue
        if path is None:
            raise InputError(None, f"the run read {name} (sha256 {recorded[:12]}...); give that file to validation")
        if recorded is None:
            raise InputError(path, f"the run read no {name}, so this file cannot be the one it scored with")
        if file_digest(path) != recorded:
            raise InputError(path, f"not the {name} the run read (its content differs; the run's: {recorded[:12]}...)")


def count_problems(data: dict, meta: RunMeta) -> Iterator[str]:
    """The sidecar's counts are the file's (counted as the generator counts them)."""
    totals = MethodTotals()
    for entry in data.values():
        totals.add(entry)
    counted, recorded = totals.as_dict(), meta.counts.as_dict()
    for name in ("queries", "candidates", "failed", "by_method"):
        if counted[name] != recorded[name]:
            yield f"the meta sidecar's counts.{name} is {recorded[name]}, the file has {counted[name]}"


def unscorable_problems(data: dict, meta: RunMeta, dataset: VQADataset) -> Iterator[str]:
    """Each query listed as unscorable is left out of the file and really has an unreadable image."""
    for query in sorted(meta.counts.unscorable_queries):
        if str(query) in data:
            yield f"query {query} is listed as unscorable in the meta sidecar, yet the file holds it"
        elif not 0 <= query < len(dataset):
            yield f"query {query} is listed as unscorable in the meta sidecar, but is not a row of the data set"
        else:
            try:
                read_rgb(dataset.image_path(query))
            except UnreadableImage:
                continue
            yield f"query {query} is listed as unscorable in the meta sidecar, but its image reads fine"


def journal_problems(data: dict, meta: RunMeta, beam_queries: list[int]) -> tuple[list[str], str]:
    """Every entry against the latest checksummed line of its query in the run's journals.

    Returns the problems and what was checked (for the report). When a journal is not there (moved,
    pruned), nothing is checked; a journal that is there but damaged or of other settings is an
    InputError, as it is for the generator.
    """
    paths = [Path(p) for p in meta.journals]
    if not paths or not all(p.is_file() for p in paths):
        log.info("the run's journal is not there (%s): entries not checked against it", ", ".join(meta.journals))
        return [], "not found"
    journals = [(path, _journal_spec(path, meta, beam_queries, i, len(paths))) for i, path in enumerate(paths)]
    index = collect_journal_index(journals)  # every line checked (checksum, schema, shard)
    problems, handles = [], {}
    try:
        for key, entry in data.items():
            where = index.get(int(key))
            if where is None:
                problems.append(f"query {key} is not in the run's journal")
                continue
            record = _read(handles, where)
            if record["entry"] != entry:
                problems.append(f"query {key} differs from its journaled result")
        for query in sorted(meta.counts.unscorable_queries):
            where = index.get(query)
            if where is None or not _read(handles, where)["stats"].get("query_error"):
                problems.append(f"query {query} is listed as unscorable, but the journal does not say so")
    finally:
        for handle in handles.values():
            handle.close()
    return problems, f"{len(data)} entries checked against {len(paths)} journal file(s)"


def _journal_spec(path: Path, meta: RunMeta, beam_queries: list[int], shard_id: int, num_shards: int) -> JournalSpec:
    """The spec the journal's header states, which must be the sidecar's run and this shard."""
    with open(path, "rb") as handle:
        first = handle.readline()
    try:
        spec = JournalSpec.from_header(json.loads(first))
    except ValueError:
        raise InputError(path, "line 1 is not a journal header") from None
    if spec.fingerprint != meta.fingerprint or spec.settings != meta.settings.raw:
        raise InputError(path, f"a journal of another run (fingerprint {spec.fingerprint}, not {meta.fingerprint})")
    shard = tuple(shard_of(beam_queries, num_shards, shard_id, meta.settings.block_size))
    if (spec.shard_id, spec.num_shards) != (shard_id, num_shards) or spec.queries != shard:
        raise InputError(path, f"not shard {shard_id} of {num_shards} of the beam data's queries")
    return spec


def _read(handles: dict, where: tuple[Path, int]) -> dict:
    path, offset = where
    handle = handles.get(path) or handles.setdefault(path, open(path, "rb"))
    return read_entry(handle, offset)
