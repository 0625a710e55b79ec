"""The declared data schema of a site, and the checks that hold a site's data to it.

A schema names the task, the columns and their kinds. Sites with the same schema share a
fingerprint; the orchestrator federates only sites whose fingerprints match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from twin_core.errors import SchemaError, SiteDataError

TASKS = ("patient_twin", "tabular")
PROBLEMS = ("regression", "classification")


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # "numeric" or "categorical"
    min: float | None = None
    max: float | None = None
    categories: tuple = ()
    max_missing: float = 0.05  # share of rows that may lack a value before the data check fails


@dataclass(frozen=True)
class DataSchema:
    """What a site's table looks like and which task trains on it."""

    task: str
    target: str
    features: tuple[Feature, ...]
    document: dict  # the schema as declared, canonical source of the fingerprint
    id_column: str | None = None
    visit_column: str | None = None
    arm_column: str | None = None
    calendar_column: str | None = None
    horizon: int = 0
    problem: str = "regression"
    classes: tuple = ()
    hidden: tuple[int, ...] = (64, 64)
    target_max_missing: float = 0.0  # patient twin: share of visits that may be unobserved

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def numeric_features(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind == "numeric")

    @property
    def categorical_features(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind == "categorical")

    @property
    def required_columns(self) -> list[str]:
        cols = [self.id_column, self.visit_column, self.arm_column, self.calendar_column]
        return [c for c in cols if c] + [f.name for f in self.features] + [self.target]


def _require(doc: Mapping, key: str, source: str) -> object:
    if key not in doc or doc[key] in (None, ""):
        raise SchemaError(f"{source}: missing required key {key!r}")
    return doc[key]


def _check_labels(labels: tuple, what: str, source: str) -> tuple:
    if any(isinstance(v, bool) for v in labels):
        raise SchemaError(
            f"{source}: {what} {list(labels)} hold booleans: YAML reads unquoted yes/no/on/off/"
            'true/false as booleans; quote them (for example ["no", "yes"])'
        )
    return labels


def _parse_feature(item: object, source: str) -> Feature:
    if not isinstance(item, Mapping) or "name" not in item:
        raise SchemaError(f"{source}: each feature needs at least a name, got {item!r}")
    kind = item.get("kind", "numeric")
    if kind not in ("numeric", "categorical"):
        raise SchemaError(f"{source}: feature {item['name']!r} has unknown kind {kind!r}")
    cats = _check_labels(
        tuple(item.get("categories") or ()), f"categories of {item['name']!r}", source
    )
    if kind == "categorical" and len(cats) < 2:
        raise SchemaError(f"{source}: categorical feature {item['name']!r} needs >= 2 categories")
    lo, hi = item.get("min"), item.get("max")
    max_missing = _fraction(
        item.get("max_missing", 0.05), f"max_missing of {item['name']!r}", source
    )
    return Feature(
        str(item["name"]),
        kind,
        None if lo is None else float(lo),
        None if hi is None else float(hi),
        cats,
        max_missing,
    )


def _fraction(value: object, what: str, source: str) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        out = -1.0
    if not 0.0 <= out <= 1.0:
        raise SchemaError(f"{source}: {what} must be a fraction in [0, 1], got {value!r}")
    return out


def parse_schema(doc: Mapping, source: str = "schema") -> DataSchema:
    """Build a DataSchema from a parsed YAML/JSON document; SchemaError on anything wrong."""
    if not isinstance(doc, Mapping):
        raise SchemaError(f"{source}: expected a mapping at top level, got {type(doc).__name__}")
    task = _require(doc, "task", source)
    if task not in TASKS:
        raise SchemaError(f"{source}: unknown task {task!r} (choose one of {', '.join(TASKS)})")
    features_doc = _require(doc, "features", source)
    if not isinstance(features_doc, list) or not features_doc:
        raise SchemaError(f"{source}: 'features' must be a non-empty list")
    features = tuple(_parse_feature(f, source) for f in features_doc)
    hidden = tuple(int(h) for h in doc.get("hidden", (64, 64)))
    common = {
        "task": task,
        "target": str(_require(doc, "target", source)),
        "features": features,
        "document": json.loads(json.dumps(dict(doc))),
        "id_column": doc.get("id_column"),
        "calendar_column": doc.get("calendar_column"),
        "hidden": hidden,
    }
    if task == "patient_twin":
        horizon = int(_require(doc, "horizon", source))
        if horizon < 1:
            raise SchemaError(f"{source}: horizon must be >= 1, got {horizon}")
        schema = DataSchema(
            **common,
            visit_column=str(_require(doc, "visit_column", source)),
            arm_column=str(_require(doc, "arm_column", source)),
            horizon=horizon,
            target_max_missing=_fraction(
                doc.get("target_max_missing", 0.8), "target_max_missing", source
            ),
        )
        _require(doc, "id_column", source)
    else:
        problem = doc.get("problem", "regression")
        if problem not in PROBLEMS:
            raise SchemaError(f"{source}: unknown problem {problem!r} (choose {PROBLEMS})")
        classes = _check_labels(tuple(doc.get("classes") or ()), "classes", source)
        if problem == "classification" and len(classes) < 2:
            raise SchemaError(f"{source}: classification needs 'classes' (at least two)")
        schema = DataSchema(**common, problem=problem, classes=classes)
    names = schema.required_columns
    if len(set(names)) != len(names):
        raise SchemaError(f"{source}: a column is named twice in {names}")
    return schema


def load_schema(path: Path) -> DataSchema:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SchemaError(f"schema file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SchemaError(f"{path}: not valid YAML/JSON: {exc}") from None
    return parse_schema(doc, source=str(path))


def _numeric_column(frame: pd.DataFrame, column: str, allow_missing: bool) -> pd.Series:
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise SiteDataError(
            f"column {column!r} has {int(bad.sum())} non-numeric value(s), first in data row "
            f"{first + 1}"
        )
    if not allow_missing and values.isna().any():
        first = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise SiteDataError(
            f"column {column!r} has {int(values.isna().sum())} missing value(s), first in data "
            f"row {first + 1}"
        )
    return values.astype(np.float64)


def category_codes(values: pd.Series, categories: tuple, column: str) -> np.ndarray:
    """Index of each value in `categories` (numeric categories compare numerically)."""
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in categories):
        keys = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        lookup = {float(c): i for i, c in enumerate(categories)}
    else:
        keys = values.astype(str).to_numpy()
        lookup = {str(c): i for i, c in enumerate(categories)}
    codes = np.array([lookup.get(k, -1) for k in keys], dtype=np.int64)
    if (codes < 0).any():
        unknown = int((codes < 0).sum())
        raise SiteDataError(
            f"column {column!r} has {unknown} value(s) outside the declared categories "
            f"{list(categories)}"
        )
    return codes


def check_frame(schema: DataSchema, frame: pd.DataFrame) -> pd.DataFrame:
    """Hold a site's table to its schema; return a clean copy with typed columns.

    Raises SiteDataError with the column and the count of offending values. Messages name data
    row numbers (local to the site's log), never the values themselves.
    """
    if frame.empty:
        raise SiteDataError("the data file has no rows")
    missing = [c for c in schema.required_columns if c not in frame.columns]
    if missing:
        raise SiteDataError(f"missing column(s) {missing}; the file has {list(frame.columns)[:20]}")
    out = frame[schema.required_columns].copy()
    # Ranges and missingness are the data check's business (site_worker.quality): a site whose
    # values stray stays up, reports a failing check, and is kept out of training.
    for f in schema.numeric_features:
        out[f.name] = _numeric_column(out, f.name, allow_missing=True)
    for f in schema.categorical_features:
        category_codes(out[f.name], f.categories, f.name)
    if schema.calendar_column:
        out[schema.calendar_column] = _numeric_column(out, schema.calendar_column, False)
    if schema.task == "patient_twin":
        return _check_twin_frame(schema, out)
    if schema.problem == "classification":
        category_codes(out[schema.target], schema.classes, schema.target)
    else:
        out[schema.target] = _numeric_column(out, schema.target, allow_missing=False)
    if schema.id_column and out[schema.id_column].duplicated().any():
        raise SiteDataError(f"column {schema.id_column!r} has duplicate ids")
    return out.reset_index(drop=True)


def _check_twin_frame(schema: DataSchema, out: pd.DataFrame) -> pd.DataFrame:
    idc, visit, arm = schema.id_column, schema.visit_column, schema.arm_column
    assert idc and visit and arm
    out[schema.target] = _numeric_column(out, schema.target, allow_missing=True)
    visits = _numeric_column(out, visit, allow_missing=False)
    if ((visits % 1) != 0).any() or (visits < 0).any() or (visits > schema.horizon).any():
        raise SiteDataError(f"column {visit!r} must hold whole visit numbers 0..{schema.horizon}")
    out[visit] = visits.astype(np.int64)
    arms = _numeric_column(out, arm, allow_missing=False)
    if not arms.isin([0.0, 1.0]).all():
        raise SiteDataError(f"column {arm!r} must be 0 (control) or 1 (treated)")
    out[arm] = arms.astype(np.int64)
    out[idc] = out[idc].astype(str)
    dup = out.duplicated([idc, visit])
    if dup.any():
        raise SiteDataError(f"{int(dup.sum())} duplicate ({idc}, {visit}) visit key(s)")
    per_patient = out.groupby(idc, sort=False)
    if (per_patient[arm].nunique() > 1).any():
        raise SiteDataError(f"a patient changes {arm!r} between visits")
    baseline = out[out[visit] == 0]
    no_baseline = out[idc].nunique() - baseline[idc].nunique()
    if no_baseline or baseline[schema.target].isna().any():
        raise SiteDataError(
            f"every patient needs an observed baseline {schema.target!r} at {visit} 0 "
            f"({no_baseline + int(baseline[schema.target].isna().sum())} patient(s) lack one)"
        )
    return out.sort_values([idc, visit], kind="stable").reset_index(drop=True)


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file into a DataFrame, with a clear error if it can't be parsed."""
    path = Path(path)
    if not path.exists():
        raise SiteDataError(f"data file not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except (
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        UnicodeDecodeError,
        ValueError,
        OSError,
    ) as exc:
        raise SiteDataError(f"{path}: cannot be read as {path.suffix or 'CSV'}: {exc}") from None
