"""The stages: one module per `loraflow` command, each with a `run(cfg, ...)` the CLI calls.

prepare, train, evaluate, tune, register, serve (and predict), pipeline, runs. A stage imports the
libraries (config, tracking, data, models, generation, metrics, intervals, studies, training) and
serving; it imports another stage only to run it: tune runs train (and evaluate), register runs
evaluate as its gate, pipeline runs them all.
"""
