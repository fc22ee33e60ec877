from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactRef(_message.Message):
    __slots__ = ("digest", "size_bytes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size_bytes: int
    def __init__(self, digest: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class DatasetReady(_message.Message):
    __slots__ = ("run_id", "dataset_uri", "format", "text_field", "model_name", "schema_version", "time_budget_s", "training", "quantization", "tenant")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_URI_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    dataset_uri: str
    format: str
    text_field: str
    model_name: str
    schema_version: int
    time_budget_s: float
    training: TrainingRequest
    quantization: QuantizationRequest
    tenant: str
    def __init__(self, run_id: _Optional[str] = ..., dataset_uri: _Optional[str] = ..., format: _Optional[str] = ..., text_field: _Optional[str] = ..., model_name: _Optional[str] = ..., schema_version: _Optional[int] = ..., time_budget_s: _Optional[float] = ..., training: _Optional[_Union[TrainingRequest, _Mapping]] = ..., quantization: _Optional[_Union[QuantizationRequest, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class TrainingRequest(_message.Message):
    __slots__ = ("model_size", "budget_usd", "instance_types", "family", "precision", "compile", "micro_batch", "grad_accum", "global_batch", "epochs", "market", "base_model", "adaptation", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "base_weights", "gradient_checkpointing", "chat_template", "eval_set", "packing")
    MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPES_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MARKET_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    BASE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    EVAL_SET_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    model_size: str
    budget_usd: float
    instance_types: _containers.RepeatedScalarFieldContainer[str]
    family: str
    precision: str
    compile: str
    micro_batch: int
    grad_accum: int
    global_batch: int
    epochs: float
    market: str
    base_model: str
    adaptation: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    base_weights: str
    gradient_checkpointing: str
    chat_template: str
    eval_set: str
    packing: str
    def __init__(self, model_size: _Optional[str] = ..., budget_usd: _Optional[float] = ..., instance_types: _Optional[_Iterable[str]] = ..., family: _Optional[str] = ..., precision: _Optional[str] = ..., compile: _Optional[str] = ..., micro_batch: _Optional[int] = ..., grad_accum: _Optional[int] = ..., global_batch: _Optional[int] = ..., epochs: _Optional[float] = ..., market: _Optional[str] = ..., base_model: _Optional[str] = ..., adaptation: _Optional[str] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_targets: _Optional[_Iterable[str]] = ..., base_weights: _Optional[str] = ..., gradient_checkpointing: _Optional[str] = ..., chat_template: _Optional[str] = ..., eval_set: _Optional[str] = ..., packing: _Optional[str] = ...) -> None: ...

class QuantizationRequest(_message.Message):
    __slots__ = ("method", "bits", "group_size", "on_gate_failure", "max_ppl_increase", "calibration_samples")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ON_GATE_FAILURE_FIELD_NUMBER: _ClassVar[int]
    MAX_PPL_INCREASE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    method: str
    bits: int
    group_size: int
    on_gate_failure: str
    max_ppl_increase: float
    calibration_samples: int
    def __init__(self, method: _Optional[str] = ..., bits: _Optional[int] = ..., group_size: _Optional[int] = ..., on_gate_failure: _Optional[str] = ..., max_ppl_increase: _Optional[float] = ..., calibration_samples: _Optional[int] = ...) -> None: ...

class TaskEval(_message.Message):
    __slots__ = ("examples", "exact_match", "macro_f1", "labels")
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXACT_MATCH_FIELD_NUMBER: _ClassVar[int]
    MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    examples: int
    exact_match: float
    macro_f1: float
    labels: int
    def __init__(self, examples: _Optional[int] = ..., exact_match: _Optional[float] = ..., macro_f1: _Optional[float] = ..., labels: _Optional[int] = ...) -> None: ...

class DatasetStats(_message.Message):
    __slots__ = ("records_read", "records_kept", "empty_dropped", "duplicates_dropped", "invalid_utf8_skipped", "oversized_skipped", "malformed_skipped", "train_tokens", "heldout_tokens", "train_documents", "heldout_documents", "dropped", "tallies")
    class DroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TalliesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RECORDS_READ_FIELD_NUMBER: _ClassVar[int]
    RECORDS_KEPT_FIELD_NUMBER: _ClassVar[int]
    EMPTY_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    INVALID_UTF8_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    OVERSIZED_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    TALLIES_FIELD_NUMBER: _ClassVar[int]
    records_read: int
    records_kept: int
    empty_dropped: int
    duplicates_dropped: int
    invalid_utf8_skipped: int
    oversized_skipped: int
    malformed_skipped: int
    train_tokens: int
    heldout_tokens: int
    train_documents: int
    heldout_documents: int
    dropped: _containers.ScalarMap[str, int]
    tallies: _containers.ScalarMap[str, int]
    def __init__(self, records_read: _Optional[int] = ..., records_kept: _Optional[int] = ..., empty_dropped: _Optional[int] = ..., duplicates_dropped: _Optional[int] = ..., invalid_utf8_skipped: _Optional[int] = ..., oversized_skipped: _Optional[int] = ..., malformed_skipped: _Optional[int] = ..., train_tokens: _Optional[int] = ..., heldout_tokens: _Optional[int] = ..., train_documents: _Optional[int] = ..., heldout_documents: _Optional[int] = ..., dropped: _Optional[_Mapping[str, int]] = ..., tallies: _Optional[_Mapping[str, int]] = ...) -> None: ...

class DatasetPrepared(_message.Message):
    __slots__ = ("run_id", "model_name", "dataset", "vocab_size", "seq_len", "stats", "time_budget_s", "training")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_name: str
    dataset: ArtifactRef
    vocab_size: int
    seq_len: int
    stats: DatasetStats
    time_budget_s: float
    training: TrainingRequest
    def __init__(self, run_id: _Optional[str] = ..., model_name: _Optional[str] = ..., dataset: _Optional[_Union[ArtifactRef, _Mapping]] = ..., vocab_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., stats: _Optional[_Union[DatasetStats, _Mapping]] = ..., time_budget_s: _Optional[float] = ..., training: _Optional[_Union[TrainingRequest, _Mapping]] = ...) -> None: ...

class ResourcePlan(_message.Message):
    __slots__ = ("preset", "hidden_size", "num_layers", "num_heads", "intermediate_size", "seq_len", "micro_batch", "grad_accum", "max_steps", "learning_rate", "warmup_steps", "checkpoint_interval", "precision", "device", "pool", "parameters", "estimated_seconds", "seed", "vocab_size", "family", "engine", "zero_stage", "offload_optimizer", "offload_params", "gradient_checkpointing", "world_size", "compile", "estimated_memory_gib", "instance_type", "market", "price_usd_per_hour", "estimated_usd", "preemptions_per_hour", "checkpoint_cost_s", "checkpoint_interval_s", "time_budget_s", "planned_flops_per_device", "throughput_source", "memory_headroom_gib", "device_memory_gib", "base_model", "adaptation", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "base_weights", "trainable_parameters", "adaptation_reason")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_MEMORY_GIB_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MARKET_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_USD_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_COST_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    PLANNED_FLOPS_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_HEADROOM_GIB_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_GIB_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    BASE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_REASON_FIELD_NUMBER: _ClassVar[int]
    preset: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    max_steps: int
    learning_rate: float
    warmup_steps: int
    checkpoint_interval: int
    precision: str
    device: str
    pool: str
    parameters: int
    estimated_seconds: float
    seed: int
    vocab_size: int
    family: str
    engine: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool
    world_size: int
    compile: bool
    estimated_memory_gib: float
    instance_type: str
    market: str
    price_usd_per_hour: float
    estimated_usd: float
    preemptions_per_hour: float
    checkpoint_cost_s: float
    checkpoint_interval_s: float
    time_budget_s: float
    planned_flops_per_device: float
    throughput_source: str
    memory_headroom_gib: float
    device_memory_gib: float
    base_model: str
    adaptation: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    base_weights: str
    trainable_parameters: int
    adaptation_reason: str
    def __init__(self, preset: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_heads: _Optional[int] = ..., intermediate_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., micro_batch: _Optional[int] = ..., grad_accum: _Optional[int] = ..., max_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., checkpoint_interval: _Optional[int] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., pool: _Optional[str] = ..., parameters: _Optional[int] = ..., estimated_seconds: _Optional[float] = ..., seed: _Optional[int] = ..., vocab_size: _Optional[int] = ..., family: _Optional[str] = ..., engine: _Optional[str] = ..., zero_stage: _Optional[int] = ..., offload_optimizer: _Optional[bool] = ..., offload_params: _Optional[bool] = ..., gradient_checkpointing: _Optional[bool] = ..., world_size: _Optional[int] = ..., compile: _Optional[bool] = ..., estimated_memory_gib: _Optional[float] = ..., instance_type: _Optional[str] = ..., market: _Optional[str] = ..., price_usd_per_hour: _Optional[float] = ..., estimated_usd: _Optional[float] = ..., preemptions_per_hour: _Optional[float] = ..., checkpoint_cost_s: _Optional[float] = ..., checkpoint_interval_s: _Optional[float] = ..., time_budget_s: _Optional[float] = ..., planned_flops_per_device: _Optional[float] = ..., throughput_source: _Optional[str] = ..., memory_headroom_gib: _Optional[float] = ..., device_memory_gib: _Optional[float] = ..., base_model: _Optional[str] = ..., adaptation: _Optional[str] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_targets: _Optional[_Iterable[str]] = ..., base_weights: _Optional[str] = ..., trainable_parameters: _Optional[int] = ..., adaptation_reason: _Optional[str] = ...) -> None: ...

class TrainingScheduled(_message.Message):
    __slots__ = ("run_id", "model_name", "dataset", "plan", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_name: str
    dataset: ArtifactRef
    plan: ResourcePlan
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., model_name: _Optional[str] = ..., dataset: _Optional[_Union[ArtifactRef, _Mapping]] = ..., plan: _Optional[_Union[ResourcePlan, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("run_id", "step", "total_steps", "loss", "learning_rate", "tokens_per_second", "eta_seconds", "mfu", "attempt", "delivery", "measured_flops", "instance_type", "calibration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MFU_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FLOPS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    mfu: float
    attempt: int
    delivery: int
    measured_flops: float
    instance_type: str
    calibration: str
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., mfu: _Optional[float] = ..., attempt: _Optional[int] = ..., delivery: _Optional[int] = ..., measured_flops: _Optional[float] = ..., instance_type: _Optional[str] = ..., calibration: _Optional[str] = ...) -> None: ...

class TrainingCheckpointed(_message.Message):
    __slots__ = ("run_id", "step", "checkpoint", "checkpoint_seconds", "next_interval")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    checkpoint: ArtifactRef
    checkpoint_seconds: float
    next_interval: int
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., checkpoint: _Optional[_Union[ArtifactRef, _Mapping]] = ..., checkpoint_seconds: _Optional[float] = ..., next_interval: _Optional[int] = ...) -> None: ...

class TrainingPreempted(_message.Message):
    __slots__ = ("run_id", "step", "checkpoint", "reason", "scheduled")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    checkpoint: ArtifactRef
    reason: str
    scheduled: TrainingScheduled
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., checkpoint: _Optional[_Union[ArtifactRef, _Mapping]] = ..., reason: _Optional[str] = ..., scheduled: _Optional[_Union[TrainingScheduled, _Mapping]] = ...) -> None: ...

class ModelTrained(_message.Message):
    __slots__ = ("run_id", "model_name", "model", "dataset", "heldout_perplexity", "train_tokens", "steps", "wall_seconds", "parameters", "final_loss", "resumed_from_step", "peak_memory_bytes", "device", "world_size", "stopped_at_budget", "planned_steps", "base_model", "adaptation", "trainable_parameters", "adapter_dir", "task_eval", "assistant_perplexity")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PLANNED_STEPS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DIR_FIELD_NUMBER: _ClassVar[int]
    TASK_EVAL_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_name: str
    model: ArtifactRef
    dataset: ArtifactRef
    heldout_perplexity: float
    train_tokens: int
    steps: int
    wall_seconds: float
    parameters: int
    final_loss: float
    resumed_from_step: int
    peak_memory_bytes: int
    device: str
    world_size: int
    stopped_at_budget: bool
    planned_steps: int
    base_model: str
    adaptation: str
    trainable_parameters: int
    adapter_dir: str
    task_eval: TaskEval
    assistant_perplexity: float
    def __init__(self, run_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model: _Optional[_Union[ArtifactRef, _Mapping]] = ..., dataset: _Optional[_Union[ArtifactRef, _Mapping]] = ..., heldout_perplexity: _Optional[float] = ..., train_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., wall_seconds: _Optional[float] = ..., parameters: _Optional[int] = ..., final_loss: _Optional[float] = ..., resumed_from_step: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., device: _Optional[str] = ..., world_size: _Optional[int] = ..., stopped_at_budget: _Optional[bool] = ..., planned_steps: _Optional[int] = ..., base_model: _Optional[str] = ..., adaptation: _Optional[str] = ..., trainable_parameters: _Optional[int] = ..., adapter_dir: _Optional[str] = ..., task_eval: _Optional[_Union[TaskEval, _Mapping]] = ..., assistant_perplexity: _Optional[float] = ...) -> None: ...

class ModelQuantized(_message.Message):
    __slots__ = ("run_id", "model_name", "model", "quantized", "dataset", "method", "bits", "group_size", "perplexity_before", "perplexity_after", "passed_quality_gate", "perplexity_fp", "perplexity_rtn_int4", "perplexity_awq_int4", "served", "served_reason", "weight_format", "quantize_seconds", "task_eval_fp", "task_eval_quantized")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_AFTER_FIELD_NUMBER: _ClassVar[int]
    PASSED_QUALITY_GATE_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FP_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_RTN_INT4_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_AWQ_INT4_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    SERVED_REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TASK_EVAL_FP_FIELD_NUMBER: _ClassVar[int]
    TASK_EVAL_QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_name: str
    model: ArtifactRef
    quantized: ArtifactRef
    dataset: ArtifactRef
    method: str
    bits: int
    group_size: int
    perplexity_before: float
    perplexity_after: float
    passed_quality_gate: bool
    perplexity_fp: float
    perplexity_rtn_int4: float
    perplexity_awq_int4: float
    served: str
    served_reason: str
    weight_format: str
    quantize_seconds: float
    task_eval_fp: TaskEval
    task_eval_quantized: TaskEval
    def __init__(self, run_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model: _Optional[_Union[ArtifactRef, _Mapping]] = ..., quantized: _Optional[_Union[ArtifactRef, _Mapping]] = ..., dataset: _Optional[_Union[ArtifactRef, _Mapping]] = ..., method: _Optional[str] = ..., bits: _Optional[int] = ..., group_size: _Optional[int] = ..., perplexity_before: _Optional[float] = ..., perplexity_after: _Optional[float] = ..., passed_quality_gate: _Optional[bool] = ..., perplexity_fp: _Optional[float] = ..., perplexity_rtn_int4: _Optional[float] = ..., perplexity_awq_int4: _Optional[float] = ..., served: _Optional[str] = ..., served_reason: _Optional[str] = ..., weight_format: _Optional[str] = ..., quantize_seconds: _Optional[float] = ..., task_eval_fp: _Optional[_Union[TaskEval, _Mapping]] = ..., task_eval_quantized: _Optional[_Union[TaskEval, _Mapping]] = ...) -> None: ...

class ModelExported(_message.Message):
    __slots__ = ("run_id", "model_name", "export", "onnx_max_abs_diff", "onnx_opset", "version", "onnx_parity_steps", "onnx_heldout_perplexity", "onnx_int8_heldout_perplexity", "triton_model", "precision", "precision_reason", "tenant")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    ONNX_MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    ONNX_OPSET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNX_PARITY_STEPS_FIELD_NUMBER: _ClassVar[int]
    ONNX_HELDOUT_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    ONNX_INT8_HELDOUT_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TRITON_MODEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_name: str
    export: ArtifactRef
    onnx_max_abs_diff: float
    onnx_opset: int
    version: str
    onnx_parity_steps: int
    onnx_heldout_perplexity: float
    onnx_int8_heldout_perplexity: float
    triton_model: str
    precision: str
    precision_reason: str
    tenant: str
    def __init__(self, run_id: _Optional[str] = ..., model_name: _Optional[str] = ..., export: _Optional[_Union[ArtifactRef, _Mapping]] = ..., onnx_max_abs_diff: _Optional[float] = ..., onnx_opset: _Optional[int] = ..., version: _Optional[str] = ..., onnx_parity_steps: _Optional[int] = ..., onnx_heldout_perplexity: _Optional[float] = ..., onnx_int8_heldout_perplexity: _Optional[float] = ..., triton_model: _Optional[str] = ..., precision: _Optional[str] = ..., precision_reason: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ModelDeployed(_message.Message):
    __slots__ = ("run_id", "model_name", "version", "endpoint", "backend", "precision", "precision_reason", "tenant")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_name: str
    version: str
    endpoint: str
    backend: str
    precision: str
    precision_reason: str
    tenant: str
    def __init__(self, run_id: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[str] = ..., endpoint: _Optional[str] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., precision_reason: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class StageFailed(_message.Message):
    __slots__ = ("run_id", "stage", "subject", "reason", "deliveries", "dead_lettered")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    stage: str
    subject: str
    reason: str
    deliveries: int
    dead_lettered: bool
    def __init__(self, run_id: _Optional[str] = ..., stage: _Optional[str] = ..., subject: _Optional[str] = ..., reason: _Optional[str] = ..., deliveries: _Optional[int] = ..., dead_lettered: _Optional[bool] = ...) -> None: ...

class ServiceScale(_message.Message):
    __slots__ = ("service", "replicas", "reason", "pinned", "load", "load_unknown", "forecast_load", "forecast_lead_s", "policy")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    FORECAST_LOAD_FIELD_NUMBER: _ClassVar[int]
    FORECAST_LEAD_S_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    service: str
    replicas: int
    reason: str
    pinned: bool
    load: float
    load_unknown: bool
    forecast_load: float
    forecast_lead_s: float
    policy: str
    def __init__(self, service: _Optional[str] = ..., replicas: _Optional[int] = ..., reason: _Optional[str] = ..., pinned: _Optional[bool] = ..., load: _Optional[float] = ..., load_unknown: _Optional[bool] = ..., forecast_load: _Optional[float] = ..., forecast_lead_s: _Optional[float] = ..., policy: _Optional[str] = ...) -> None: ...

class ScalingDecided(_message.Message):
    __slots__ = ("run_id", "services", "decided_at_unix_ms")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceScale]
    decided_at_unix_ms: int
    def __init__(self, run_id: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceScale, _Mapping]]] = ..., decided_at_unix_ms: _Optional[int] = ...) -> None: ...
