"""The file MLflow loads a registered loraflow model from (MLflow's models from code).

    mlflow.pyfunc.log_model(python_model="<this file>", artifacts={"model": merged_dir}, ...)

Logging a file instead of a pickled object keeps the model loadable across Python and library
versions; the model is loraflow's TextGenerator (text_model.py), whose source goes along as code_paths.
"""
import mlflow

from loraflow.serving.text_model import TextGenerator

mlflow.models.set_model(TextGenerator())
