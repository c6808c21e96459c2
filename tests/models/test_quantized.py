"""The kept quantised copy on a GPU machine: load_model reads and keeps it there too, apart from the CPU's."""
from __future__ import annotations

import torch

from loraflow import models
from loraflow.config import load_config


def test_a_quantised_model_is_loaded_through_the_kept_copy_on_a_gpu_too(tiny_llama, write_project, monkeypatch):
    cfg = load_config(str(write_project(tiny_llama, model={"quantization": "nf4", "dtype": "bf16"})))
    loaded = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.loading, "load_quantized", lambda cfg, path, kwargs: loaded.append(path) or "nf4 model")
    model, _ = models.load_model(cfg, str(tiny_llama))
    assert model == "nf4 model" and loaded == [str(tiny_llama)]


def test_the_cpu_and_the_gpu_keep_copies_of_their_own(tiny_llama, write_project, monkeypatch):
    cfg = load_config(str(write_project(tiny_llama, model={"quantization": "nf4", "dtype": "bf16"})))
    kwargs = {"dtype": torch.bfloat16, "quantization_config": models.quantization_config(cfg)}
    on_cpu = models.quantized_fingerprint(cfg, str(tiny_llama), kwargs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = models.quantized_fingerprint(cfg, str(tiny_llama), kwargs)
    assert (on_cpu["device"], on_gpu["device"]) == ("cpu", "cuda")
    assert {k: v for k, v in on_cpu.items() if k != "device"} == {k: v for k, v in on_gpu.items() if k != "device"}
