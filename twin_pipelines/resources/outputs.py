"""Where the assets' values are kept between steps and runs: pickled files, one per asset and
round, in the layout of Dagster's filesystem IO manager (`<base_dir>/<asset>/<partition>`), so
a re-executed step in a later run loads what an earlier run wrote, whichever wrote it.

Dagster's own filesystem IO manager logs two or three debug messages for every value it writes
or reads ("Loading 1 partitions...", "Loading partition r0007 from ...", "Writing file at
..."), and each message is an event in the run's event log: 32 of a round's ~110 events, each
a write to the event log (on the embedded default's SQLite instance, a connection, an insert
and a commit per event). This one writes and reads the same files without them; the step's
own LOADED_INPUT and HANDLED_OUTPUT events still say which value went where.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import dagster as dg


class AssetValueFiles(dg.ConfigurableIOManagerFactory):
    """The assets' values as pickled files under `base_dir` (default: the Dagster instance's
    storage folder, as Dagster's filesystem IO manager)."""

    base_dir: str = ""

    def create_io_manager(self, context: dg.InitResourceContext) -> PickledAssetValues:
        base = self.base_dir or (
            context.instance.storage_directory() if context.instance else ".dagster_storage"
        )
        return PickledAssetValues(Path(base))


class PickledAssetValues(dg.IOManager):
    def __init__(self, base: Path) -> None:
        self.base = base

    def path(self, asset_key: dg.AssetKey, partition: str | None) -> Path:
        path = self.base.joinpath(*asset_key.path)
        return path / partition if partition is not None else path

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if context.has_asset_key:
            partitions = context.asset_partition_keys if context.has_asset_partitions else [None]
            paths = [self.path(context.asset_key, p) for p in partitions]
        else:  # an op's output: per run, step and output, as Dagster keeps them
            paths = [self.base.joinpath(*context.get_identifier())]
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        for path in paths:
            _write_atomically(path, payload)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(paths[0]))})

    def load_input(self, context: dg.InputContext) -> Any:
        if not context.has_asset_key:
            return _read(self.base.joinpath(*context.upstream_output.get_identifier()))
        if not context.has_asset_partitions:
            return _read(self.path(context.asset_key, None))
        keys = context.asset_partition_keys
        if len(keys) == 1:
            return _read(self.path(context.asset_key, keys[0]))
        return {key: _read(self.path(context.asset_key, key)) for key in keys}


def _read(path: Path) -> Any:
    try:
        with path.open("rb") as file:
            return pickle.load(file)
    except FileNotFoundError:
        raise dg.Failure(
            f"no stored value at {path}: the step that makes it has not run for this round "
            "(materialize it first, or re-execute the whole run)"
        ) from None


def _write_atomically(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_bytes(payload)
    os.replace(scratch, path)
