"""The site's data check: a Great Expectations suite derived from the declared schema.

The report leaves the hospital, so it holds aggregates only: which expectation on which
column, whether it passed, and the share of rows that failed it. GX is asked for the least
detailed result that still counts unexpected rows (``BASIC`` with no partial list), and only
booleans and fractions are copied out of it: never a value, a row index or an id.

Importing ``great_expectations`` costs seconds, so it happens on the first check only; the
built validation definition is cached per schema fingerprint and later checks cost ~0.1 s.
"""

from __future__ import annotations

import threading
from typing import Any

import pandas as pd

from twin_core.monitoring import ExpectationOutcome, QualityReport
from twin_core.schema import DataSchema, Feature

# Counts, no samples: "BASIC" lists up to 20 unexpected values unless told to list none.
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 0}

# A spec is (expectation type, its kwargs); the GX class name is the type in CamelCase.
Spec = tuple[str, dict[str, Any]]

# (fingerprint, specs) -> (validation definition, expectation ids in spec order). The specs are
# part of the key so a schema altered in code, not in its document, cannot reuse a stale suite.
_VALIDATORS: dict[tuple[str, str], tuple[Any, tuple[str, ...]]] = {}
_LOCK = threading.Lock()  # the worker serves calls from a thread pool; GX is not thread-safe


def _is_numeric(labels: tuple) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels)


def _label_set(labels: tuple) -> list:
    """Declared labels as the checked column holds them (see `_comparable`)."""
    return [float(v) for v in labels] if _is_numeric(labels) else [str(v) for v in labels]


def _comparable(values: pd.Series, labels: tuple) -> pd.Series:
    """Values compared like `twin_core.schema.category_codes` does: numerically when the labels
    are numbers (a value that is no number stays as it is, and so is unexpected), else as text.
    Missing values stay missing, for the not-null expectation to count."""
    if _is_numeric(labels):
        numbers = pd.to_numeric(values, errors="coerce")
        return numbers.astype(object).where(numbers.notna() | values.isna(), values)
    return values.where(values.isna(), values.astype(str)).astype(object)


def _not_null(column: str, max_missing: float) -> Spec:
    return ("expect_column_values_to_not_be_null", {"column": column, "mostly": 1.0 - max_missing})


def _in_set(column: str, labels: tuple) -> Spec:
    return (
        "expect_column_values_to_be_in_set",
        {"column": column, "value_set": _label_set(labels)},
    )


def _feature_specs(f: Feature) -> list[Spec]:
    if f.kind == "categorical":
        return [_in_set(f.name, f.categories), _not_null(f.name, f.max_missing)]
    numeric_types = {"column": f.name, "type_list": ["float64", "float32", "int64", "int32"]}
    specs: list[Spec] = [("expect_column_values_to_be_in_type_list", numeric_types)]
    if f.min is not None or f.max is not None:
        bounds = {"column": f.name, "min_value": f.min, "max_value": f.max}
        specs.append(("expect_column_values_to_be_between", bounds))
    return specs + [_not_null(f.name, f.max_missing)]


def expectation_specs(schema: DataSchema) -> list[Spec]:
    """The suite derived from `schema`, in report order: features as declared, then the task's.

    Args:
        schema: The site's declared data schema.

    Returns:
        ``(expectation type, kwargs)`` pairs, one per expectation.
    """
    specs: list[Spec] = [
        (
            "expect_table_columns_to_match_set",
            {"column_set": schema.required_columns, "exact_match": False},
        )
    ]
    specs += [s for f in schema.features for s in _feature_specs(f)]
    if schema.task == "patient_twin":
        idc, visit, arm = schema.id_column, schema.visit_column, schema.arm_column
        assert idc and visit and arm  # parse_schema requires them for this task
        specs += [
            ("expect_compound_columns_to_be_unique", {"column_list": [idc, visit]}),
            _in_set(arm, (0, 1)),
            (
                "expect_column_values_to_be_between",
                {"column": visit, "min_value": 0, "max_value": schema.horizon},
            ),
            _not_null(schema.target, schema.target_max_missing),
        ]
        if schema.calendar_column:
            specs.append(_not_null(schema.calendar_column, 0.0))
        return specs
    specs.append(_not_null(schema.target, 0.0))
    if schema.problem == "classification":
        specs.append(_in_set(schema.target, schema.classes))
    if schema.id_column:
        specs.append(("expect_column_values_to_be_unique", {"column": schema.id_column}))
    return specs


def _build(schema: DataSchema, specs: list[Spec]) -> tuple[Any, tuple[str, ...]]:
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    expectations = [
        getattr(gxe, "".join(w.capitalize() for w in kind.split("_")))(**kwargs)
        for kind, kwargs in specs
    ]
    suite = ctx.suites.add(
        gx.ExpectationSuite(name=f"{schema.task}-{schema.fingerprint}", expectations=expectations)
    )
    batch = (
        ctx.data_sources.add_pandas("site")
        .add_dataframe_asset("site_data")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="site_data_check", data=batch, suite=suite)
    )
    return definition, tuple(str(e.id) for e in suite.expectations)


def _prepare(schema: DataSchema, frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose labelled columns compare with their declared label sets."""
    labelled = {f.name: f.categories for f in schema.categorical_features}
    if schema.task == "patient_twin" and schema.arm_column:
        labelled[schema.arm_column] = (0, 1)
    elif schema.problem == "classification":
        labelled[schema.target] = schema.classes
    return frame.assign(**{c: _comparable(frame[c], labels) for c, labels in labelled.items()})


def _fraction(result: dict, success: bool) -> float:
    """Share of all rows that failed. Table- and type-level checks have no row counts: they
    hold for all rows or none; a check GX could not compute (no counts) counts as all."""
    rows, unexpected = result.get("element_count"), result.get("unexpected_count")
    if rows is None or unexpected is None:
        return 0.0 if success and "observed_value" in result else 1.0
    return float(unexpected) / float(rows) if rows else 0.0


def check_data(site_id: str, schema: DataSchema, frame: pd.DataFrame) -> QualityReport:
    """Run the schema's expectation suite on a site's data, keeping aggregates only.

    Args:
        site_id: The reporting site.
        schema: The site's declared data schema.
        frame: The site's table as returned by `twin_core.schema.check_frame`.

    Returns:
        One outcome per expectation in `expectation_specs` order; see `quality_score`.
    """
    specs = expectation_specs(schema)
    data = _prepare(schema, frame)
    key = (schema.fingerprint, repr(specs))
    with _LOCK:
        if key not in _VALIDATORS:
            _VALIDATORS[key] = _build(schema, specs)
        definition, ids = _VALIDATORS[key]
        run = definition.run(batch_parameters={"dataframe": data}, result_format=RESULT_FORMAT)
    by_id = {str(r.expectation_config.id): r for r in run.results}
    outcomes = []
    for (kind, kwargs), eid in zip(specs, ids, strict=True):
        result = by_id[eid]
        column = kwargs.get("column") or ",".join(kwargs.get("column_list", ()))
        outcomes.append(
            ExpectationOutcome(
                kind,
                column,
                bool(result.success),
                _fraction(dict(result.result), bool(result.success)),
            )
        )
    return QualityReport(
        site_id=site_id,
        success=all(o.success for o in outcomes),
        score=quality_score(outcomes),
        rows=len(frame),
        outcomes=tuple(outcomes),
        suite=f"{schema.task}-{schema.fingerprint}",
    )


def quality_score(outcomes: list[ExpectationOutcome]) -> float:
    """Mean share of rows meeting each expectation: 1.0 when every row meets every one.

    Graded, unlike pass/fail: two sites that both pass can still differ (one has a few
    tolerated missing values), which quality-weighted aggregation uses.
    """
    return sum(1.0 - o.unexpected_fraction for o in outcomes) / len(outcomes) if outcomes else 1.0
