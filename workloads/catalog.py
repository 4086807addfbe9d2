"""Named workloads shipped with hetplan (`workloads/catalog/*.yaml`) and workload files.

A catalog file holds a list under `workloads:`; each entry is a workload file's content. Anywhere a
workload name is accepted, a path works too: a hetplan workload YAML/JSON (with `family:`) or a Hugging
Face `config.json`. Duplicate names are an error; unknown names suggest the nearest ones.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from hwmodel.errors import SpecError, UnknownNameError
from hwmodel.loading import read_mapping, validate
from workloads.config import WorkloadConfig
from workloads.hf import from_hf_config, is_hf_config


@lru_cache(maxsize=1)
def _catalog() -> dict[str, WorkloadConfig]:
    folder = Path(str(resources.files("workloads"))) / "catalog"
    out: dict[str, WorkloadConfig] = {}
    for path in sorted(folder.glob("*.yaml")):
        data = read_mapping(path)
        entries = data.get("workloads")
        if not isinstance(entries, list):
            raise SpecError(f"{path}: workloads: expected a list of workload entries")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            raise SpecError(f"{path}: defaults: expected a mapping of field: value")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise SpecError(f"{path}: workloads[{i}]: expected a mapping of field: value")
            cfg = validate(WorkloadConfig, {**defaults, **entry}, f"{path}: workloads[{i}]")
            if cfg.name in out:
                raise SpecError(f"{path}: workloads[{i}].name: {cfg.name!r} is defined twice; names must be unique")
            out[cfg.name] = cfg
    return out


def workload_names() -> list[str]:
    return sorted(_catalog())


def load_workload_file(path: str | Path, seq_len: int | None = None) -> WorkloadConfig:
    path = Path(path)
    data = read_mapping(path)
    if is_hf_config(data) and "family" not in data:
        return from_hf_config(
            data, str(path), name=path.stem if path.stem != "config" else path.parent.name or "custom", seq_len=seq_len
        )
    data.setdefault("name", path.stem)
    cfg = validate(WorkloadConfig, data, str(path))
    return cfg.with_seq_len(seq_len) if seq_len else cfg


def load_workload(name_or_path: str, seq_len: int | None = None) -> WorkloadConfig:
    """A workload by catalog name or file path, optionally at another sequence length."""
    if name_or_path.endswith((".yaml", ".yml", ".json")) or os.sep in name_or_path:
        return load_workload_file(name_or_path, seq_len)
    catalog = _catalog()
    if name_or_path not in catalog:
        raise UnknownNameError("workload", name_or_path, catalog)
    cfg = catalog[name_or_path]
    if seq_len is not None and seq_len != cfg.seq_len:
        if seq_len <= 0:
            raise SpecError(f"--seq-len must be a positive integer, got {seq_len}")
        return cfg.with_seq_len(seq_len)
    return cfg
