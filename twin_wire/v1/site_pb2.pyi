from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("tensors", "total_bytes", "sha256")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    sha256: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class ColumnMoments(_message.Message):
    __slots__ = ("column", "count", "sum", "sum_squares")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    column: str
    count: float
    sum: float
    sum_squares: float
    def __init__(self, column: _Optional[str] = ..., count: _Optional[float] = ..., sum: _Optional[float] = ..., sum_squares: _Optional[float] = ...) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("site_id", "task", "schema_json", "schema_fingerprint", "units", "train_examples", "holdout_examples", "moments", "versions", "data_check_passed", "data_check_score", "data_check_summary", "drift_known", "dataset_drift", "drifted_share", "train_units")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_CHECK_PASSED_FIELD_NUMBER: _ClassVar[int]
    DATA_CHECK_SCORE_FIELD_NUMBER: _ClassVar[int]
    DATA_CHECK_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    DRIFT_KNOWN_FIELD_NUMBER: _ClassVar[int]
    DATASET_DRIFT_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_SHARE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_UNITS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    task: str
    schema_json: str
    schema_fingerprint: str
    units: int
    train_examples: int
    holdout_examples: int
    moments: _containers.RepeatedCompositeFieldContainer[ColumnMoments]
    versions: _containers.ScalarMap[str, str]
    data_check_passed: bool
    data_check_score: float
    data_check_summary: str
    drift_known: bool
    dataset_drift: bool
    drifted_share: float
    train_units: int
    def __init__(self, site_id: _Optional[str] = ..., task: _Optional[str] = ..., schema_json: _Optional[str] = ..., schema_fingerprint: _Optional[str] = ..., units: _Optional[int] = ..., train_examples: _Optional[int] = ..., holdout_examples: _Optional[int] = ..., moments: _Optional[_Iterable[_Union[ColumnMoments, _Mapping]]] = ..., versions: _Optional[_Mapping[str, str]] = ..., data_check_passed: _Optional[bool] = ..., data_check_score: _Optional[float] = ..., data_check_summary: _Optional[str] = ..., drift_known: _Optional[bool] = ..., dataset_drift: _Optional[bool] = ..., drifted_share: _Optional[float] = ..., train_units: _Optional[int] = ...) -> None: ...

class TrainConfig(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "learning_rate", "seed", "weight_decay", "optimizer", "proximal_mu", "time_budget_s", "dp_clip", "dpsgd_noise_multiplier", "dpsgd_clip", "local_steps", "compression", "topk_fraction")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_FIELD_NUMBER: _ClassVar[int]
    DPSGD_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DPSGD_CLIP_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    weight_decay: float
    optimizer: str
    proximal_mu: float
    time_budget_s: float
    dp_clip: float
    dpsgd_noise_multiplier: float
    dpsgd_clip: float
    local_steps: int
    compression: str
    topk_fraction: float
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., weight_decay: _Optional[float] = ..., optimizer: _Optional[str] = ..., proximal_mu: _Optional[float] = ..., time_budget_s: _Optional[float] = ..., dp_clip: _Optional[float] = ..., dpsgd_noise_multiplier: _Optional[float] = ..., dpsgd_clip: _Optional[float] = ..., local_steps: _Optional[int] = ..., compression: _Optional[str] = ..., topk_fraction: _Optional[float] = ...) -> None: ...

class TrainHeader(_message.Message):
    __slots__ = ("site_id", "round_key", "schema_fingerprint", "config", "weights", "masking")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_KEY_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MASKING_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round_key: str
    schema_fingerprint: str
    config: TrainConfig
    weights: WeightsHeader
    masking: MaskingPlan
    def __init__(self, site_id: _Optional[str] = ..., round_key: _Optional[str] = ..., schema_fingerprint: _Optional[str] = ..., config: _Optional[_Union[TrainConfig, _Mapping]] = ..., weights: _Optional[_Union[WeightsHeader, _Mapping]] = ..., masking: _Optional[_Union[MaskingPlan, _Mapping]] = ...) -> None: ...

class MaskingPlan(_message.Message):
    __slots__ = ("shared", "incoming", "weighting")
    SHARED_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    shared: _containers.RepeatedScalarFieldContainer[str]
    incoming: _containers.RepeatedCompositeFieldContainer[SealedShare]
    weighting: str
    def __init__(self, shared: _Optional[_Iterable[str]] = ..., incoming: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., weighting: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TrainHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[TrainHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("site_id", "round_key", "num_examples", "steps", "metrics", "train_seconds", "weights")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round_key: str
    num_examples: int
    steps: int
    metrics: _containers.ScalarMap[str, float]
    train_seconds: float
    weights: WeightsHeader
    def __init__(self, site_id: _Optional[str] = ..., round_key: _Optional[str] = ..., num_examples: _Optional[int] = ..., steps: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., train_seconds: _Optional[float] = ..., weights: _Optional[_Union[WeightsHeader, _Mapping]] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class EvaluateHeader(_message.Message):
    __slots__ = ("site_id", "round_key", "schema_fingerprint", "weights")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_KEY_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round_key: str
    schema_fingerprint: str
    weights: WeightsHeader
    def __init__(self, site_id: _Optional[str] = ..., round_key: _Optional[str] = ..., schema_fingerprint: _Optional[str] = ..., weights: _Optional[_Union[WeightsHeader, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EvaluateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[EvaluateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class EvaluateReply(_message.Message):
    __slots__ = ("site_id", "round_key", "num_examples", "statistics", "eval_seconds")
    class StatisticsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round_key: str
    num_examples: int
    statistics: _containers.ScalarMap[str, float]
    eval_seconds: float
    def __init__(self, site_id: _Optional[str] = ..., round_key: _Optional[str] = ..., num_examples: _Optional[int] = ..., statistics: _Optional[_Mapping[str, float]] = ..., eval_seconds: _Optional[float] = ...) -> None: ...

class DataCheckRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class ExpectationOutcome(_message.Message):
    __slots__ = ("expectation", "column", "success", "unexpected_fraction")
    EXPECTATION_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    UNEXPECTED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    expectation: str
    column: str
    success: bool
    unexpected_fraction: float
    def __init__(self, expectation: _Optional[str] = ..., column: _Optional[str] = ..., success: _Optional[bool] = ..., unexpected_fraction: _Optional[float] = ...) -> None: ...

class DataCheckReply(_message.Message):
    __slots__ = ("site_id", "success", "score", "rows", "suite", "outcomes")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    success: bool
    score: float
    rows: int
    suite: str
    outcomes: _containers.RepeatedCompositeFieldContainer[ExpectationOutcome]
    def __init__(self, site_id: _Optional[str] = ..., success: _Optional[bool] = ..., score: _Optional[float] = ..., rows: _Optional[int] = ..., suite: _Optional[str] = ..., outcomes: _Optional[_Iterable[_Union[ExpectationOutcome, _Mapping]]] = ...) -> None: ...

class DriftRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("column", "score", "method", "threshold", "drifted")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    column: str
    score: float
    method: str
    threshold: float
    drifted: bool
    def __init__(self, column: _Optional[str] = ..., score: _Optional[float] = ..., method: _Optional[str] = ..., threshold: _Optional[float] = ..., drifted: _Optional[bool] = ...) -> None: ...

class DriftReply(_message.Message):
    __slots__ = ("site_id", "has_reference", "drifted_share", "dataset_drift", "drift_share_threshold", "features", "reference_rows", "current_rows", "report_html", "reference_round")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_SHARE_FIELD_NUMBER: _ClassVar[int]
    DATASET_DRIFT_FIELD_NUMBER: _ClassVar[int]
    DRIFT_SHARE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROWS_FIELD_NUMBER: _ClassVar[int]
    REPORT_HTML_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROUND_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    has_reference: bool
    drifted_share: float
    dataset_drift: bool
    drift_share_threshold: float
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    reference_rows: int
    current_rows: int
    report_html: bytes
    reference_round: str
    def __init__(self, site_id: _Optional[str] = ..., has_reference: _Optional[bool] = ..., drifted_share: _Optional[float] = ..., dataset_drift: _Optional[bool] = ..., drift_share_threshold: _Optional[float] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., reference_rows: _Optional[int] = ..., current_rows: _Optional[int] = ..., report_html: _Optional[bytes] = ..., reference_round: _Optional[str] = ...) -> None: ...

class AdvertisedKeys(_message.Message):
    __slots__ = ("site_id", "cipher_public_key", "mask_public_key", "self_mask_commitment", "signature", "certificate_pem")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    cipher_public_key: bytes
    mask_public_key: bytes
    self_mask_commitment: bytes
    signature: bytes
    certificate_pem: bytes
    def __init__(self, site_id: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., self_mask_commitment: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("from_site", "to_site", "ciphertext")
    FROM_SITE_FIELD_NUMBER: _ClassVar[int]
    TO_SITE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    from_site: str
    to_site: str
    ciphertext: bytes
    def __init__(self, from_site: _Optional[str] = ..., to_site: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("holder", "owner", "kind", "index", "value")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    holder: str
    owner: str
    kind: str
    index: int
    value: bytes
    def __init__(self, holder: _Optional[str] = ..., owner: _Optional[str] = ..., kind: _Optional[str] = ..., index: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class SecAggAdvertise(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("roster", "threshold")
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    roster: _containers.RepeatedCompositeFieldContainer[AdvertisedKeys]
    threshold: int
    def __init__(self, roster: _Optional[_Iterable[_Union[AdvertisedKeys, _Mapping]]] = ..., threshold: _Optional[int] = ...) -> None: ...

class SecAggUnmask(_message.Message):
    __slots__ = ("survivors",)
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("site_id", "round_key", "advertise", "share", "unmask")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_KEY_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round_key: str
    advertise: SecAggAdvertise
    share: SecAggShare
    unmask: SecAggUnmask
    def __init__(self, site_id: _Optional[str] = ..., round_key: _Optional[str] = ..., advertise: _Optional[_Union[SecAggAdvertise, _Mapping]] = ..., share: _Optional[_Union[SecAggShare, _Mapping]] = ..., unmask: _Optional[_Union[SecAggUnmask, _Mapping]] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("site_id", "round_key", "keys", "sealed", "revealed")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_KEY_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    REVEALED_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round_key: str
    keys: AdvertisedKeys
    sealed: _containers.RepeatedCompositeFieldContainer[SealedShare]
    revealed: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, site_id: _Optional[str] = ..., round_key: _Optional[str] = ..., keys: _Optional[_Union[AdvertisedKeys, _Mapping]] = ..., sealed: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., revealed: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...
