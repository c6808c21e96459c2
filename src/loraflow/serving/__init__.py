"""What a registered model runs as: the pyfunc model, request bounds and batching, the server.

    info = serving.log_model(cfg, merged_dir, adapter_dir)   # the register stage logs the version
    process = serving.start_server("models:/quickstart@champion", store)   # serving.app in a process

requests: what a request may ask and what a failure answers; batching: the engine (the model's
thread, micro-batches, streams); text_model: `TextGenerator`, the pyfunc; pyfunc: logging it with
loraflow's code; versions: the versions one server holds; openai_api: the OpenAI routes; app: the
server (both APIs on one port); server: its process. The serve stage is `loraflow.stages.serve`.

The names below are the package's interface, and also what models registered by earlier layouts
call: such a model carries its own copy of loraflow, but in a process that has imported loraflow
already the installed package answers for it, through `loraflow.serving.TextGenerator`, `invalid`
and the helpers its chat flavour calls (run_in_turn, model_thread, ...). Under plain `mlflow models
serve`, `UVICORN_LOOP=loraflow.serving:server_loop` names the event loop that lets requests batch.
"""
from loraflow.serving.batching import (BATCH_WAIT_SECONDS, MAX_BATCH_ROWS, SERVER_LOOP_ENV, Engine, Job,
                                       model_thread, run_in_turn, server_loop)
from loraflow.serving.pyfunc import log_model, model_signature, pip_requirements
from loraflow.serving.requests import (GENERATION_DEFAULTS, MAX_ROWS, MAX_SEED, REQUEST_SECONDS_ENV,
                                       SERVER_TIMEOUT_MARGIN_SECONDS, UNSET_MODEL_MAX_LENGTH, checked_params,
                                       context_length, cut_from_left, fit_prompt, http_error, invalid,
                                       prompt_tails, prompts_from, request_budget, request_config)
from loraflow.serving.server import (answers_of, default_model_uri, end_process_group, predict_over_http,
                                     serve_command, server_env, start_server, stop_server, wait_until_ready)
from loraflow.serving.text_model import TextGenerator, load_served_model, saved_settings, serving_config
