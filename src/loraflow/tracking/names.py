"""The run contract's names: every `loraflow.*` tag (`Tags`) and every metric key (`role_key`).

    mlflow.set_tag(Tags.STAGE, "train"); role_key("delta", "rougeL", "_ci_low")  # 'delta/rougeL_ci_low'

Stages never spell a tag or parse a key themselves: they use these.
"""
from __future__ import annotations


class Tags:
    """The `loraflow.*` run tags (and the gate's model-version tags): one home for every name."""
    STAGE = "loraflow.stage"
    PROJECT = "loraflow.project"
    GIT_SHA = "loraflow.git_sha"
    CONFIG_HASH = "loraflow.config_hash"
    TRAINING_HASH = "loraflow.training_hash"  # of the sections that decide a trained adapter
    DATA_DIGEST = "loraflow.data_digest"
    DATA_SOURCE = "loraflow.data_source"
    BASE_MODEL = "loraflow.base_model"
    BASE_MODEL_PATH = "loraflow.base_model_path"
    OUTPUT_DIR = "loraflow.output_dir"
    ATTENTION = "loraflow.attention"  # the attention implementation training used (models.faster_cpu_attention)
    ADAPTER_MODEL_ID = "loraflow.adapter_model_id"  # the training run's adapter as an MLflow logged model
    ERROR = "loraflow.error"
    HEARTBEAT = "loraflow.heartbeat"  # unix time, refreshed while the stage's process lives
    HOST = "loraflow.host"
    PID = "loraflow.pid"
    STEP_KEY = "loraflow.step_key"
    # tune
    STUDY = "loraflow.study"
    STUDY_RUN_ID = "loraflow.study_run_id"
    TRIAL_NUMBER = "loraflow.trial_number"
    TRIAL_STATE = "loraflow.trial_state"
    OPTUNA_STORAGE = "loraflow.optuna_storage"
    OBJECTIVE = "loraflow.objective"
    BEST_RUN_ID = "loraflow.best_run_id"
    BEST_TRIAL = "loraflow.best_trial"
    # evaluate
    EVALUATED_RUN_ID = "loraflow.evaluated_run_id"
    LATEST_EVALUATION_RUN_ID = "loraflow.latest_evaluation_run_id"
    TUNED_MODEL = "loraflow.tuned_model"
    ZERO_SHOT = "loraflow.zero_shot"
    GATE_FOR_RUN_ID = "loraflow.gate_for_run_id"
    # register (run tags, then model-version tags)
    SOURCE_RUN_ID = "loraflow.source_run_id"
    REGISTER_RUN_ID = "loraflow.register_run_id"
    REGISTERED_VERSION = "loraflow.registered_version"
    SERVED_DTYPE = "loraflow.served_dtype"  # gate run and version: the dtype the version is judged and served in
    CHAT_MODEL_URI = "loraflow.chat_model_uri"  # version tag of versions registered with a chat flavour (before 0.2)
    GATE = "loraflow.gate"
    GATE_REASON = "loraflow.gate_reason"
    GATE_METRIC = "gate.metric"
    GATE_FORCED = "gate.forced"
    GATE_MIN_IMPROVEMENT = "gate.min_improvement"
    GATE_IMPROVEMENT = "gate.improvement"
    GATE_TUNED_SCORE = "gate.tuned_score"
    GATE_BASE_SCORE = "gate.base_score"
    GATE_DELTA_LOW = "gate.delta_low"
    GATE_DELTA_HIGH = "gate.delta_high"
    # export (run tags; the version links to each export by Tags.export(quantization))
    EXPORTED_VERSION = "loraflow.exported_version"  # models:/NAME/VERSION, the version an export run converted
    EXPORT_QUANTIZATION = "loraflow.export_quantization"  # f16, q8_0 or f32
    EXPORT_PATH = "loraflow.export_path"  # the folder the GGUF, Modelfile and README went to
    EXPORT_SHA256 = "loraflow.export_sha256"  # of the GGUF file
    # MLflow's own
    PARENT_RUN_ID = "mlflow.parentRunId"
    RUN_NAME = "mlflow.runName"

    @staticmethod
    def step(stage: str, field: str) -> str:
        """The pipeline parent's tag for one step: `loraflow.step.train.run_id`, `...reused`."""
        return f"loraflow.step.{stage}.{field}"

    @staticmethod
    def export(quantization: str) -> str:
        """The model version's tag naming its export run in one quantization: `loraflow.export.f16`."""
        return f"loraflow.export.{quantization}"


TRAIN_LOSS, EVAL_LOSS = "train/loss", "eval/loss"
ROLES = ("base", "tuned", "delta")
SUFFIXES = ("_std", "_ci_low", "_ci_high")


def role_key(role: str, metric: str, suffix: str = "") -> str:
    """`tuned/rougeL`, `delta/rougeL_ci_low`: the evaluation's metric keys."""
    return f"{role}/{metric}{suffix}"


def split_role_key(key: str) -> tuple[str, str, str] | None:
    """("delta", "rougeL", "_ci_low") for `delta/rougeL_ci_low`; None for keys that are not evaluation keys."""
    role, slash, rest = key.partition("/")
    if not slash or role not in ROLES:
        return None
    for suffix in SUFFIXES:
        if rest.endswith(suffix):
            return role, rest.removesuffix(suffix), suffix
    return role, rest, ""


def evaluated_metrics(metrics: dict) -> list[str]:
    """The metric names an evaluation scored (those with a `tuned/<name>` mean), sorted."""
    return sorted({parts[1] for key in metrics if (parts := split_role_key(key)) and parts[0] == "tuned"
                   and not parts[2]})


def evaluation_means(metrics: dict) -> dict:
    """The base/tuned/delta means of an evaluation's metrics, without stds or intervals."""
    return {key: value for key, value in metrics.items() if (parts := split_role_key(key)) and not parts[2]}
