"""The run contract: tag names, metric keys, the store and experiment, finding runs, lineage, artifacts.

    store = tracking.connect("sqlite:///mlflow.db", experiment="quickstart")   # or from the environment
    with tracking.stage_run(cfg, "train", store) as run:      # FAILED on error, KILLED on interrupt/prune
        ...
    runs = tracking.find_runs(store, stage="train", status="FINISHED", config_hash=cfg.config_hash())

Every `loraflow.*` tag is a constant of `Tags`, every metric key is built by the helpers in `names`,
and every search for runs goes through `find_runs`: stages never spell a tag or parse a key
themselves. names: tags and keys; store: the store, experiments, run searches; lineage: hashes,
digests, redaction; liveness: heartbeats and reaping; runs: a stage's run, buffered metrics,
artifacts. The names below are the package's interface.
"""
from loraflow.tracking.lineage import (TRAINING_SECTIONS, file_digest, first_line, flat_params, git_sha, lineage_tags,
                                       redact, training_hash)
from loraflow.tracking.liveness import Heartbeat, heartbeat_seconds, is_dead, process_alive, reap_dead_runs
from loraflow.tracking.names import (EVAL_LOSS, ROLES, SUFFIXES, TRAIN_LOSS, Tags, evaluated_metrics, evaluation_means,
                                     role_key, split_role_key)
from loraflow.tracking.runs import (MetricBuffer, StoreUnavailable, download_model_uri, download_run_artifacts,
                                    log_config, log_figure_png, model_version_run_id, run_status_for, stage_run)
from loraflow.tracking.store import (Store, connect, experiment_url, find_runs, get_or_create_experiment, get_run,
                                     is_main_process, local_config_file, local_defaults)

__all__ = ["TRAINING_SECTIONS", "file_digest", "first_line", "flat_params", "git_sha", "lineage_tags", "redact",
           "training_hash", "Heartbeat", "heartbeat_seconds", "is_dead", "process_alive", "reap_dead_runs",
           "EVAL_LOSS", "ROLES", "SUFFIXES", "TRAIN_LOSS", "Tags", "evaluated_metrics", "evaluation_means",
           "role_key", "split_role_key", "MetricBuffer", "StoreUnavailable", "download_run_artifacts", "log_config",
           "download_model_uri", "model_version_run_id",
           "log_figure_png", "run_status_for", "stage_run", "Store", "connect", "experiment_url", "find_runs",
           "get_or_create_experiment", "get_run", "is_main_process", "local_config_file", "local_defaults"]
