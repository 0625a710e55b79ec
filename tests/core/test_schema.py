"""Tests for twin_core.schema: parsing declared schemas and holding site tables to them."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from twin_core.cohort import CohortConfig, cohort_schema, generate_cohort
from twin_core.errors import SchemaError, SiteDataError
from twin_core.schema import Feature, check_frame, load_schema, parse_schema, read_table

_COHORT = generate_cohort(CohortConfig(seed=7))


def _site_frame() -> pd.DataFrame:
    return _COHORT.site("site-1")


def _twin_schema():
    return parse_schema(cohort_schema())


def _regression_doc() -> dict:
    return {
        "task": "tabular",
        "problem": "regression",
        "target": "y",
        "id_column": "row_id",
        "features": [
            {"name": "x1", "kind": "numeric"},
            {"name": "x2", "min": -10, "max": 10},
            {"name": "color", "kind": "categorical", "categories": ["red", "green", "blue"]},
        ],
        "hidden": [8, 4],
    }


def _classification_doc() -> dict:
    return {
        "task": "tabular",
        "problem": "classification",
        "target": "label",
        "classes": ["neg", "pos"],
        "features": [{"name": "x1"}, {"name": "x2"}],
    }


# ---- parse_schema -------------------------------------------------------------------------------
def test_parse_cohort_schema():
    s = _twin_schema()
    assert s.task == "patient_twin"
    assert s.target == "y"
    assert (s.id_column, s.visit_column, s.arm_column, s.calendar_column) == (
        "patient_id",
        "visit",
        "arm",
        "calendar_day",
    )
    assert s.horizon == 6
    assert s.features == (
        Feature("age", "numeric", 18.0, 90.0),
        Feature("sex", "categorical", None, None, (0, 1)),
        Feature("bmi", "numeric", 5.0, 80.0),
    )
    assert [f.name for f in s.numeric_features] == ["age", "bmi"]
    assert [f.name for f in s.categorical_features] == ["sex"]
    assert s.required_columns == [
        "patient_id",
        "visit",
        "arm",
        "calendar_day",
        "age",
        "sex",
        "bmi",
        "y",
    ]
    assert s.hidden == (64, 64)
    assert s.document == cohort_schema()


def test_parse_tabular_regression():
    s = parse_schema(_regression_doc())
    assert s.task == "tabular" and s.problem == "regression"
    assert s.target == "y" and s.id_column == "row_id"
    assert s.visit_column is None and s.arm_column is None and s.horizon == 0
    assert s.features[0] == Feature("x1", "numeric")
    assert s.features[1] == Feature("x2", "numeric", -10.0, 10.0)
    assert s.features[2].categories == ("red", "green", "blue")
    assert s.hidden == (8, 4)
    assert s.classes == ()
    assert s.required_columns == ["row_id", "x1", "x2", "color", "y"]


def test_parse_tabular_classification():
    s = parse_schema(_classification_doc())
    assert s.problem == "classification"
    assert s.classes == ("neg", "pos")
    assert s.required_columns == ["x1", "x2", "label"]
    assert s.id_column is None


def test_problem_defaults_to_regression():
    doc = _regression_doc()
    del doc["problem"]
    assert parse_schema(doc).problem == "regression"


def _doc_without(base: dict, *keys: str) -> dict:
    doc = copy.deepcopy(base)
    for k in keys:
        doc.pop(k)
    return doc


def _doc_with(base: dict, **changes) -> dict:
    doc = copy.deepcopy(base)
    doc.update(changes)
    return doc


_REG = _regression_doc()
_CLS = _classification_doc()
_TWIN = cohort_schema()


@pytest.mark.parametrize(
    "doc, pattern",
    [
        (["task", "tabular"], r"expected a mapping at top level, got list"),
        (
            _doc_with(_REG, task="forecast"),
            r"unknown task 'forecast' \(choose one of patient_twin, tabular\)",
        ),
        (_doc_without(_REG, "task"), r"missing required key 'task'"),
        (_doc_without(_REG, "target"), r"missing required key 'target'"),
        (_doc_with(_REG, target=""), r"missing required key 'target'"),
        (_doc_with(_REG, target=None), r"missing required key 'target'"),
        (_doc_with(_REG, features=[]), r"'features' must be a non-empty list"),
        (_doc_without(_REG, "features"), r"missing required key 'features'"),
        (_doc_with(_REG, features={"x1": "numeric"}), r"'features' must be a non-empty list"),
        (_doc_with(_REG, features=[{"kind": "numeric"}]), r"each feature needs at least a name"),
        (_doc_with(_REG, features=["x1"]), r"each feature needs at least a name"),
        (
            _doc_with(_REG, features=[{"name": "x1", "kind": "text"}]),
            r"feature 'x1' has unknown kind 'text'",
        ),
        (
            _doc_with(_REG, features=[{"name": "c", "kind": "categorical", "categories": ["a"]}]),
            r"categorical feature 'c' needs >= 2 categories",
        ),
        (
            _doc_with(_REG, features=[{"name": "c", "kind": "categorical"}]),
            r"categorical feature 'c' needs >= 2 categories",
        ),
        (_doc_without(_CLS, "classes"), r"classification needs 'classes' \(at least two\)"),
        (_doc_with(_CLS, classes=["only"]), r"classification needs 'classes'"),
        (_doc_with(_REG, problem="ranking"), r"unknown problem 'ranking'"),
        (
            _doc_with(_REG, features=[{"name": "y"}]),
            r"a column is named twice in \['row_id', 'y', 'y'\]",
        ),
        (
            _doc_with(_CLS, features=[{"name": "x1"}, {"name": "x1"}]),
            r"a column is named twice",
        ),
        (_doc_with(_TWIN, id_column="age"), r"a column is named twice"),
        (_doc_with(_TWIN, visit_column="arm"), r"a column is named twice"),
        (_doc_without(_TWIN, "horizon"), r"missing required key 'horizon'"),
        (_doc_with(_TWIN, horizon=0), r"horizon must be >= 1, got 0"),
        (_doc_without(_TWIN, "visit_column"), r"missing required key 'visit_column'"),
        (_doc_without(_TWIN, "arm_column"), r"missing required key 'arm_column'"),
        (_doc_without(_TWIN, "id_column"), r"missing required key 'id_column'"),
    ],
    ids=[
        "not-mapping",
        "unknown-task",
        "no-task",
        "no-target",
        "empty-target",
        "null-target",
        "empty-features",
        "no-features",
        "features-not-list",
        "feature-no-name",
        "feature-bare-string",
        "unknown-kind",
        "one-category",
        "no-categories",
        "classification-no-classes",
        "classification-one-class",
        "unknown-problem",
        "feature-named-as-target",
        "feature-twice",
        "twin-id-is-feature",
        "twin-visit-is-arm",
        "twin-no-horizon",
        "twin-horizon-zero",
        "twin-no-visit",
        "twin-no-arm",
        "twin-no-id",
    ],
)
def test_parse_schema_errors(doc, pattern):
    with pytest.raises(SchemaError, match=pattern):
        parse_schema(doc)


def test_error_message_names_its_source():
    with pytest.raises(SchemaError, match=r"^hospital-a/schema\.yaml: unknown task 'x'"):
        parse_schema(_doc_with(_REG, task="x"), source="hospital-a/schema.yaml")


# ---- fingerprint ------------------------------------------------------------------------------
def _reverse_keys(obj):
    if isinstance(obj, dict):
        return {k: _reverse_keys(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [_reverse_keys(v) for v in obj]
    return obj


@pytest.mark.parametrize("doc", [_TWIN, _REG, _CLS], ids=["twin", "regression", "classification"])
def test_fingerprint_stable_across_key_order(doc):
    reordered = _reverse_keys(doc)
    assert list(reordered) != list(doc)
    a, b = parse_schema(doc), parse_schema(reordered)
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 16
    int(a.fingerprint, 16)  # hex
    assert parse_schema(copy.deepcopy(doc)).fingerprint == a.fingerprint


def _change_feature(doc: dict, index: int, **changes) -> dict:
    doc = copy.deepcopy(doc)
    doc["features"][index].update(changes)
    return doc


@pytest.mark.parametrize(
    "changed",
    [
        _change_feature(_TWIN, 0, name="age_years"),
        _change_feature(_TWIN, 0, max=100),
        _change_feature(_TWIN, 1, categories=[0, 1, 2]),
        _change_feature(_TWIN, 2, kind="numeric", min=10),
        _doc_with(_TWIN, target="y2"),
        _doc_with(_TWIN, horizon=5),
        _doc_with(_TWIN, features=_TWIN["features"][:2]),
        _doc_with(_TWIN, features=list(reversed(_TWIN["features"]))),
    ],
    ids=["rename", "range", "categories", "min", "target", "horizon", "dropped", "reordered"],
)
def test_fingerprint_changes_when_a_column_changes(changed):
    assert parse_schema(changed).fingerprint != _twin_schema().fingerprint


def test_load_schema_from_yaml(tmp_path):
    import yaml

    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(cohort_schema(), sort_keys=False))
    assert load_schema(path).fingerprint == _twin_schema().fingerprint
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    with pytest.raises(SchemaError, match="not valid YAML"):
        load_schema(tmp_path / "bad.yaml")
    with pytest.raises(SchemaError, match="schema file not found"):
        load_schema(tmp_path / "absent.yaml")


# ---- check_frame: twin ------------------------------------------------------------------------
def test_check_frame_passes_on_real_site_frame():
    frame = _site_frame()
    out = check_frame(_twin_schema(), frame)
    assert list(out.columns) == _twin_schema().required_columns
    assert len(out) == len(frame)
    assert out["visit"].dtype == np.int64 and out["arm"].dtype == np.int64
    assert out["age"].dtype == np.float64 and out["y"].dtype == np.float64
    assert out["y"].isna().sum() == frame["y"].isna().sum()
    # sorted by (patient, visit)
    keys = list(zip(out["patient_id"], out["visit"], strict=True))
    assert keys == sorted(keys)
    # the input is not modified
    pd.testing.assert_frame_equal(frame, _site_frame())


def test_check_frame_sorts_shuffled_rows():
    frame = _site_frame()
    shuffled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    schema = _twin_schema()
    pd.testing.assert_frame_equal(check_frame(schema, shuffled), check_frame(schema, frame))


def test_check_frame_accepts_numeric_strings():
    frame = _site_frame().astype({"age": str})
    out = check_frame(_twin_schema(), frame)
    assert out["age"].dtype == np.float64
    np.testing.assert_array_equal(
        out["age"].to_numpy(), check_frame(_twin_schema(), _site_frame())["age"].to_numpy()
    )


def _set(column: str, row: int, value, as_object: bool = False):
    def mutate(frame: pd.DataFrame) -> pd.DataFrame:
        if as_object or isinstance(value, str):
            frame = frame.astype({column: object})
        elif isinstance(value, float) and frame[column].dtype.kind == "i":
            frame = frame.astype({column: np.float64})
        frame.loc[row, column] = value
        return frame

    return mutate


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda f: f.drop(columns=["bmi"]), r"missing column\(s\) \['bmi'\]"),
        (lambda f: f.drop(columns=["visit", "arm"]), r"missing column\(s\) \['visit', 'arm'\]"),
        (_set("age", 3, "abc"), r"column 'age' has 1 non-numeric value\(s\), first in data row 4"),
        (
            _set("sex", 3, 2),
            r"column 'sex' has 1 value\(s\) outside the declared categories \[0, 1\]",
        ),
        (
            _set("sex", 3, "female"),
            r"column 'sex' has 1 value\(s\) outside the declared categories",
        ),
        (
            lambda f: pd.concat([f, f.iloc[[5]]], ignore_index=True),
            r"1 duplicate \(patient_id, visit\)",
        ),
        (_set("visit", 3, 2), r"duplicate \(patient_id, visit\)"),
        (_set("arm", 3, 2), r"column 'arm' must be 0 \(control\) or 1 \(treated\)"),
        (_set("arm", 3, -1), r"column 'arm' must be 0"),
        (_set("visit", 3, 7), r"column 'visit' must hold whole visit numbers 0\.\.6"),
        (_set("visit", 3, -1), r"column 'visit' must hold whole visit numbers 0\.\.6"),
        (_set("visit", 3, 1.5), r"column 'visit' must hold whole visit numbers"),
        (_set("visit", 3, "three"), r"column 'visit' has 1 non-numeric value"),
        (_set("y", 0, np.nan), r"observed baseline 'y' at visit 0 \(1 patient\(s\) lack one\)"),
        (lambda f: f[f["visit"] != 0], r"observed baseline 'y' at visit 0 \(20 patient\(s\)"),
        (_set("y", 3, "n/a"), r"column 'y' has 1 non-numeric value"),
        (_set("calendar_day", 3, np.nan), r"column 'calendar_day' has 1 missing value"),
        (_set("calendar_day", 3, "monday"), r"column 'calendar_day' has 1 non-numeric value"),
        (lambda f: f.iloc[:0], r"the data file has no rows"),
        (
            lambda f: f.assign(arm=np.where(f.index == 0, 1 - f["arm"], f["arm"])),
            r"a patient changes 'arm' between visits",
        ),
    ],
    ids=[
        "missing-column",
        "missing-two-columns",
        "age-not-numeric",
        "sex-unknown-code",
        "sex-unknown-string",
        "duplicate-row",
        "duplicate-visit",
        "arm-2",
        "arm-negative",
        "visit-beyond-horizon",
        "visit-negative",
        "visit-fractional",
        "visit-not-numeric",
        "baseline-y-missing",
        "no-baseline-rows",
        "y-not-numeric",
        "calendar-missing",
        "calendar-not-numeric",
        "empty-frame",
        "arm-changes",
    ],
)
def test_check_frame_rejects_malformed_twin_data(mutate, pattern):
    frame = mutate(_site_frame().copy())
    with pytest.raises(SiteDataError, match=pattern):
        check_frame(_twin_schema(), frame)


def test_check_frame_message_does_not_leak_values():
    frame = _set("age", 3, "SECRET-123")(_site_frame().copy())
    with pytest.raises(SiteDataError) as info:
        check_frame(_twin_schema(), frame)
    assert "SECRET" not in str(info.value)


# ---- check_frame: tabular ---------------------------------------------------------------------
def _tabular_frame(n: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=n), rng.uniform(-5, 5, size=n)
    return pd.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(n)],
            "x1": x1,
            "x2": x2,
            "color": rng.choice(["red", "green", "blue"], size=n),
            "y": 2 * x1 - x2,
            "label": np.where(x1 > 0, "pos", "neg"),
        }
    )


def test_check_frame_tabular_passes():
    out = check_frame(parse_schema(_regression_doc()), _tabular_frame())
    assert list(out.columns) == ["row_id", "x1", "x2", "color", "y"]
    assert out["y"].dtype == np.float64
    out = check_frame(parse_schema(_classification_doc()), _tabular_frame())
    assert list(out.columns) == ["x1", "x2", "label"]


@pytest.mark.parametrize(
    "doc, mutate, pattern",
    [
        (
            _REG,
            _set("color", 2, "purple"),
            r"column 'color' has 1 value\(s\) outside the declared categories",
        ),
        (_REG, _set("y", 2, np.nan), r"column 'y' has 1 missing value\(s\), first in data row 3"),
        (_REG, _set("row_id", 2, "r1"), r"column 'row_id' has duplicate ids"),
        (
            _CLS,
            _set("label", 2, "maybe"),
            r"column 'label' has 1 value\(s\) outside the declared categories \['neg', 'pos'\]",
        ),
        (_CLS, lambda f: f.drop(columns=["label"]), r"missing column\(s\) \['label'\]"),
    ],
    ids=["category", "target-missing", "duplicate-id", "unknown-class", "no-target"],
)
def test_check_frame_rejects_malformed_tabular_data(doc, mutate, pattern):
    with pytest.raises(SiteDataError, match=pattern):
        check_frame(parse_schema(doc), mutate(_tabular_frame()))


@pytest.mark.parametrize(
    "mutate",
    [_set("age", 3, 12.0), _set("age", 3, 91.0), _set("age", 3, np.nan), _set("bmi", 5, 4.0)],
    ids=["age-below-range", "age-above-range", "age-missing", "bmi-below-range"],
)
def test_check_frame_leaves_ranges_and_missing_covariates_to_the_data_check(mutate):
    """Stray or missing covariate values are data quality, not structure: they load, and the
    site's Great Expectations suite (site_worker.quality) decides whether the site may train."""
    frame = _site_frame()
    out = check_frame(_twin_schema(), mutate(frame.copy()))
    assert len(out) == len(frame)


# ---- read_table -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, pattern",
    [
        (
            bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)),
            "cannot be read as .csv",
        ),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "cannot be read as .csv"),
        (b"a,b\n1,2\n1,2,3,4\n", r"cannot be read as .csv: .*Expected 2 fields"),
        (b"", "cannot be read as .csv"),
    ],
    ids=["random-bytes", "png-bytes", "ragged-rows", "empty"],
)
def test_read_table_garbage_csv(tmp_path, content, pattern):
    path = tmp_path / "site.csv"
    path.write_bytes(content)
    with pytest.raises(SiteDataError, match=pattern):
        read_table(path)


def test_read_table_garbage_parquet(tmp_path):
    path = tmp_path / "site.parquet"
    path.write_bytes(b"a,b\n1,2\n")
    with pytest.raises(SiteDataError, match="cannot be read as .parquet"):
        read_table(path)


def test_read_table_missing_file(tmp_path):
    with pytest.raises(SiteDataError, match="data file not found"):
        read_table(tmp_path / "nope.csv")


@pytest.mark.parametrize("suffix", [".parquet", ".pq"])
def test_read_table_parquet_round_trip(tmp_path, suffix):
    frame = _site_frame()
    path = tmp_path / f"site{suffix}"
    frame.to_parquet(path, index=False)
    back = read_table(path)
    pd.testing.assert_frame_equal(back, frame)
    pd.testing.assert_frame_equal(
        check_frame(_twin_schema(), back), check_frame(_twin_schema(), frame)
    )


def test_read_table_csv_round_trip(tmp_path):
    frame = _site_frame()
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    back = read_table(path)
    assert list(back.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(
        check_frame(_twin_schema(), back), check_frame(_twin_schema(), frame), check_exact=False
    )
