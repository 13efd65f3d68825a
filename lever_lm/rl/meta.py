"""The meta sidecar `<output>.meta.json`: the one typed contract between generation and validation.

The generator writes a `RunMeta` beside the data file (run metadata never goes into the data
file: the trainer would take a `_meta` key for a query); validation reads it back through the same
class. Every field validation relies on is checked on reading, so a damaged, hand-edited or
foreign sidecar is an `InputError` naming the field, not a silent default:

    {"fingerprint": the journal fingerprint = the hash of "settings",
     "data_sha256": the sha256 of the data file's bytes,
     "settings": what the fingerprint hashes (`lever_lm.rl.fingerprints.run_settings`),
     "journals": the shard journals the data file was written from,
     "counts": {"queries", "candidates", "failed", "duplicates_dropped", "by_method",
                "unscorable_queries": {query row: why}},
     "run": {"device", "batch_size", "torch_threads", "num_shards", "limit", "created"},
     "request": the run's request (its VQA model source is read back, for an audit),
     "timing", "engine", "versions": for people (not read back)}

`settings` stays the exact dict the fingerprint hashes; `RunSettings` is its typed view (the
proposal settings, the pool layout, the eval mode, ...).

The beam data job writes its sidecar through `write_meta` too, as a dict with the same top-level
keys (its own settings and counts; `lever_lm.infoscore.generate.beam_meta`); nothing reads that one back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lever_lm.errors import InputError
from lever_lm.io import atomic_output, read_json
from lever_lm.models.v3.proposals import ProposalSettings
from lever_lm.rl.fingerprints import fingerprint

META_SUFFIX = ".meta.json"


def meta_path_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + META_SUFFIX)


class MetaError(ValueError):
    """A field of the sidecar is missing or of the wrong type."""


@dataclass(frozen=True)
class PoolLayout:
    """Which pool the run proposed from (`settings.pool`)."""

    pool: str  # "global" or "per_query"
    pool_size: int | None = None  # per_query only
    sampler: str | None = None  # per_query only: cache, rand or sim
    sampler_cache: str | None = None  # with sampler cache: the content digest of the cache the run read

    @property
    def per_query(self) -> bool:
        return self.pool == "per_query"


@dataclass(frozen=True)
class RunSettings:
    """The typed view of what the fingerprint hashes; `raw` is that very dict."""

    raw: dict = field(repr=False)
    proposal: ProposalSettings
    pool: PoolLayout
    eval_mode: str
    gt_prob: bool
    block_size: int  # queries proposed together (`proposal_code.query_block`)
    inputs: dict[str, str]  # input name -> content digest
    vqa: dict  # the VQA model's identity, prompt, decoding and numerics

    @classmethod
    def parse(cls, raw: object) -> RunSettings:
        settings = _object(raw, "settings")
        proposal = _object(settings.get("proposal"), "settings.proposal")
        pool = _object(settings.get("pool"), "settings.pool")
        try:
            proposal_settings = ProposalSettings(
                shot_num=_typed(proposal, "shot_num", int, "settings.proposal"),
                num_beams=_typed(proposal, "num_beams", int, "settings.proposal"),
                temps=tuple(_numbers(proposal.get("temps"), "settings.proposal.temps")),
                num_samples_per_temp=_typed(proposal, "num_samples_per_temp", int, "settings.proposal"),
                num_random=_typed(proposal, "num_random", int, "settings.proposal"),
                num_retrieval=_typed(proposal, "num_retrieval", int, "settings.proposal"),
                exclude_same_image=_typed(proposal, "exclude_same_image", bool, "settings.proposal"),
                seed=_typed(proposal, "seed", int, "settings.proposal"),
            )
        except InputError as error:
            raise MetaError(f"settings.proposal: {error.problem}") from None
        layout = PoolLayout(
            pool=_typed(pool, "pool", str, "settings.pool"),
            pool_size=_typed(pool, "pool_size", int, "settings.pool", optional=True),
            sampler=_typed(pool, "sampler", str, "settings.pool", optional=True),
            sampler_cache=_typed(pool, "sampler_cache", str, "settings.pool", optional=True),
        )
        if layout.per_query and layout.pool_size is None:
            raise MetaError("settings.pool.pool_size is missing for per-query pools")
        code = _object(settings.get("proposal_code"), "settings.proposal_code")
        inputs = _object(settings.get("inputs"), "settings.inputs")
        if not all(isinstance(v, str) for v in inputs.values()):
            raise MetaError("settings.inputs must map input names to content digests")
        return cls(
            raw=settings,
            proposal=proposal_settings,
            pool=layout,
            eval_mode=_typed(settings, "eval_mode", str, "settings"),
            gt_prob=_typed(settings, "gt_prob", bool, "settings"),
            block_size=_typed(code, "query_block", int, "settings.proposal_code"),
            inputs=dict(inputs),
            vqa=_object(settings.get("vqa"), "settings.vqa"),
        )


@dataclass(frozen=True)
class RunCounts:
    """What the data file holds (`lever_lm.rl.output.FinalCounts`), and the queries left out of it."""

    queries: int
    candidates: int
    failed: int
    duplicates_dropped: dict[str, int]
    by_method: dict[str, dict]  # method -> {"candidates", "accuracy", "share_correct"}
    unscorable_queries: dict[int, str]  # query row -> why it has no scores

    def as_dict(self) -> dict:
        counts = asdict(self)
        counts["unscorable_queries"] = {str(q): why for q, why in self.unscorable_queries.items()}
        return counts

    @classmethod
    def parse(cls, raw: object) -> RunCounts:
        counts = _object(raw, "counts")
        unscorable = _object(counts.get("unscorable_queries"), "counts.unscorable_queries")
        if not all(k.isascii() and k.isdigit() and isinstance(v, str) for k, v in unscorable.items()):
            raise MetaError("counts.unscorable_queries must map query rows to reasons")
        return cls(
            queries=_typed(counts, "queries", int, "counts"),
            candidates=_typed(counts, "candidates", int, "counts"),
            failed=_typed(counts, "failed", int, "counts"),
            duplicates_dropped=dict(_object(counts.get("duplicates_dropped"), "counts.duplicates_dropped")),
            by_method=dict(_object(counts.get("by_method"), "counts.by_method")),
            unscorable_queries={int(k): v for k, v in unscorable.items()},
        )


@dataclass(frozen=True)
class RunInfo:
    """How the run was done: none of it changes the data, but --limit says which queries it holds."""

    device: str
    batch_size: int | None  # the effective batch size (pinned by the journal)
    torch_threads: int | None  # on a CPU, the torch thread count (pinned by the journal)
    num_shards: int
    limit: int | None  # only the first N queries of the beam data
    created: str

    @classmethod
    def parse(cls, raw: object) -> RunInfo:
        run = _object(raw, "run")
        return cls(
            device=_typed(run, "device", str, "run"),
            batch_size=_typed(run, "batch_size", int, "run", optional=True),
            torch_threads=_typed(run, "torch_threads", int, "run", optional=True),
            num_shards=_typed(run, "num_shards", int, "run"),
            limit=_typed(run, "limit", int, "run", optional=True),
            created=_typed(run, "created", str, "run"),
        )


@dataclass(frozen=True)
class ModelSource:
    """Where the run's VQA model came from (`request`): what an audit loads again."""

    vqa_model: str
    vqa_model_path: str | None
    config_path: str | None

    @classmethod
    def parse(cls, raw: object) -> ModelSource:
        request = _object(raw, "request")
        return cls(
            vqa_model=_typed(request, "vqa_model", str, "request"),
            vqa_model_path=_typed(request, "vqa_model_path", str, "request", optional=True),
            config_path=_typed(request, "config_path", str, "request", optional=True),
        )


@dataclass(frozen=True)
class RunMeta:
    """The sidecar of one data file (see the module doc). `model` is read from `request`."""

    fingerprint: str
    data_sha256: str
    settings: RunSettings
    journals: tuple[str, ...]
    counts: RunCounts
    run: RunInfo
    timing: dict = field(default_factory=dict)
    engine: dict | None = None
    versions: dict = field(default_factory=dict)
    request: dict = field(default_factory=dict)
    model: ModelSource | None = None

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "data_sha256": self.data_sha256,
            "settings": self.settings.raw,
            "journals": list(self.journals),
            "counts": self.counts.as_dict(),
            "run": asdict(self.run),
            "timing": self.timing,
            "engine": self.engine,
            "versions": self.versions,
            "request": self.request,
        }

    @classmethod
    def parse(cls, raw: object) -> RunMeta:
        """The sidecar's JSON, every field checked; MetaError naming the first bad one."""
        meta = _object(raw, "the sidecar")
        settings = RunSettings.parse(meta.get("settings"))
        stated = _typed(meta, "fingerprint", str, "")
        if stated != fingerprint(settings.raw):
            raise MetaError(f"fingerprint {stated} is not the hash of its settings ({fingerprint(settings.raw)})")
        journals = meta.get("journals")
        if not isinstance(journals, list) or not all(isinstance(j, str) for j in journals):
            raise MetaError("journals must be a list of paths")
        engine = meta.get("engine")
        request = _object(meta.get("request"), "request")
        return cls(
            fingerprint=stated,
            data_sha256=_typed(meta, "data_sha256", str, ""),
            settings=settings,
            journals=tuple(journals),
            counts=RunCounts.parse(meta.get("counts")),
            run=RunInfo.parse(meta.get("run")),
            timing=_object(meta.get("timing", {}), "timing"),
            engine=None if engine is None else _object(engine, "engine"),
            versions=_object(meta.get("versions", {}), "versions"),
            request=request,
            model=ModelSource.parse(request),
        )


def write_meta(output_path: Path, meta: RunMeta | dict) -> Path:
    """Write the sidecar of `output_path` atomically (a `RunMeta`, or another job's sidecar as a dict);
    return its path."""
    path = meta_path_for(output_path)
    data = meta.to_json() if isinstance(meta, RunMeta) else meta
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path


def read_meta(output_path: Path) -> RunMeta:
    """The sidecar of the data file `output_path`; a missing or malformed one is an InputError."""
    path = meta_path_for(output_path)
    if not path.is_file():
        raise InputError(
            path,
            f"the run's meta sidecar is missing: the generator writes it beside {output_path.name}, and without it "
            "nothing says which run made the data (restore it with the data, or regenerate)",
        )
    try:
        return RunMeta.parse(read_json(path))
    except MetaError as error:
        raise InputError(path, f"not a sidecar this generator wrote: {error}") from None


# -- field checks ---------------------------------------------------------------------------------


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise MetaError(f"{where} must be an object")
    return value


def _typed(obj: dict, name: str, kind: type, where: str, optional: bool = False):
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        label = f"{where}.{name}" if where else name
        raise MetaError(f"{label} must be {'null or ' if optional else ''}a {kind.__name__}, found {value!r}")
    return value


def _numbers(value: object, where: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise MetaError(f"{where} must be a list of numbers")
    return [float(v) for v in value]
