"""Model resolution, quantisation and LoRA attachment; the real embedded SmolLM2 in marked tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import runs_of

from loraflow import LoraflowError, models
from loraflow.config import EMBEDDED_MODEL, from_dict, load_config


def test_local_folder_and_bad_names(tiny_llama, tmp_path):
    assert models.resolve_model_path(str(tiny_llama)) == str(tiny_llama)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraflowError, match="no config.json"):
        models.resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(LoraflowError, match="model file not found"):
        models.resolve_model_path(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("quantization,layer_type", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt"),
                                                     ("none", "Linear")])
def test_quantization_and_lora_targets(tiny_llama, quantization, layer_type):
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(tiny_llama),
                     "quantization": quantization}, "lora": {"r": 2, "layers_to_transform": [1]}})
    model, tokenizer = models.load_model(cfg, str(tiny_llama))
    model = models.attach_lora(model, cfg)
    layers = model.base_model.model.model.layers
    assert type(layers[1].self_attn.q_proj.base_layer).__name__ == layer_type
    assert hasattr(layers[1].mlp.down_proj, "lora_A") and not hasattr(layers[0].mlp.down_proj, "lora_A")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert tokenizer.pad_token is not None


def copy_of(folder):
    """A tiny model folder of its own: a test may touch its files."""
    import shutil

    return shutil.copytree(folder, folder.parent / f"{folder.name}-own-{len(list(folder.parent.iterdir()))}")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantised_base_is_kept_once_and_loads_the_same_without_quantising(tiny_llama, tmp_path, monkeypatch,
                                                                             quantization):
    """The first load quantises and keeps the copy; the next loads it (bitsandbytes' quantiser made to
    fail, to show it is not called) with the same logits, and PEFT still names the source as the base.
    LORAFLOW_QUANTIZED_CACHE='' keeps none."""
    import bitsandbytes.functional

    source = copy_of(tiny_llama)
    monkeypatch.setenv("LORAFLOW_QUANTIZED_CACHE", str(tmp_path / "quantized"))
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(source), "quantization": quantization},
                     "lora": {"r": 2}})
    ids = torch.tensor([[1, 5, 9, 13, 20, 3]])
    first, _ = models.load_model(cfg, str(source))
    [kept] = (tmp_path / "quantized").iterdir()
    assert "quantization_config" in (kept / "config.json").read_text()

    def no_quantising(*args, **kwargs):
        raise AssertionError("quantised again")

    with monkeypatch.context() as patched:
        for name in ("quantize_4bit", "int8_vectorwise_quant"):
            patched.setattr(bitsandbytes.functional, name, no_quantising)
        second, _ = models.load_model(cfg, str(source))
    with torch.no_grad():
        assert torch.equal(first(ids.to(first.device)).logits, second(ids.to(second.device)).logits)
    assert models.attach_lora(second, cfg).peft_config["default"].base_model_name_or_path == str(source)

    monkeypatch.setenv("LORAFLOW_QUANTIZED_CACHE", "")
    other = copy_of(tiny_llama)
    models.load_model(cfg, str(other))
    assert list((tmp_path / "quantized").iterdir()) == [kept]


def test_a_new_copy_replaces_only_the_copy_of_older_source_files(tiny_llama, tmp_path, monkeypatch):
    """Changed source files get a new copy, which replaces the old one of the same settings; a copy of
    other settings stays, and so does a staging folder that may still be written, but not a stale one."""
    import os
    import time

    source, cache = copy_of(tiny_llama), tmp_path / "quantized"
    monkeypatch.setenv("LORAFLOW_QUANTIZED_CACHE", str(cache))

    def config(quantization):
        return from_dict({"name": "m", "data": {"path": "x"},
                          "model": {"name": str(source), "quantization": quantization}})
    models.load_model(config("nf4"), str(source))
    [nf4_copy] = cache.iterdir()
    models.load_model(config("int8"), str(source))
    [int8_copy] = set(cache.iterdir()) - {nf4_copy}
    stale, fresh = cache / f"{nf4_copy.name}.died", cache / f"{nf4_copy.name}.saving"
    stale.mkdir(), fresh.mkdir()
    os.utime(stale, (time.time() - 2 * models.STALE_STAGING_SECONDS,) * 2)

    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # the same bytes, a new mtime: the source may have changed
    models.load_model(config("nf4"), str(source))
    [new_copy] = set(cache.iterdir()) - {int8_copy, fresh}
    assert new_copy != nf4_copy and (new_copy / "config.json").is_file()
    assert set(cache.iterdir()) == {new_copy, int8_copy, fresh}


def test_a_damaged_quantised_copy_is_made_again(tiny_llama, tmp_path, monkeypatch, capsys):
    source = copy_of(tiny_llama)
    monkeypatch.setenv("LORAFLOW_QUANTIZED_CACHE", str(tmp_path / "quantized"))
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(source), "quantization": "nf4"}})
    ids = torch.tensor([[1, 5, 9, 13, 20, 3]])
    first, _ = models.load_model(cfg, str(source))
    [kept] = (tmp_path / "quantized").iterdir()
    (kept / "model.safetensors").write_bytes(b"truncated")
    second, _ = models.load_model(cfg, str(source))
    assert "quantising again" in capsys.readouterr().err
    with torch.no_grad():
        assert torch.equal(first(ids.to(first.device)).logits, second(ids.to(second.device)).logits)
    third, _ = models.load_model(cfg, str(source))  # the copy was made again, whole
    assert (kept / "model.safetensors").stat().st_size > 1000 and [p.name for p in kept.parent.iterdir()] == [kept.name]


def test_a_disk_that_fills_while_keeping_the_copy_leaves_no_half_copy(tiny_llama, tmp_path, monkeypatch, capsys):
    """Saving fails half-way (a full disk, injected): the run goes on with its model, the cache holds
    nothing (no half-written copy for the next load to trust), and the next load keeps the copy whole."""
    from pathlib import Path

    from transformers import PreTrainedModel

    source = copy_of(tiny_llama)
    monkeypatch.setenv("LORAFLOW_QUANTIZED_CACHE", str(tmp_path / "quantized"))
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(source), "quantization": "nf4"}})
    save = PreTrainedModel.save_pretrained

    def disk_full(self, folder, **kwargs):
        save(self, folder, **kwargs)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(PreTrainedModel, "save_pretrained", disk_full)
        model, _ = models.load_model(cfg, str(source))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert "could not keep a quantised copy" in capsys.readouterr().err
    assert list((tmp_path / "quantized").iterdir()) == []
    models.load_model(cfg, str(source))
    [kept] = (tmp_path / "quantized").iterdir()
    assert (kept / "model.safetensors").stat().st_size > 1000


def test_compute_dtype_follows_the_config(tiny_llama):
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": "x", "dtype": name}})
        assert models.compute_dtype(cfg) == dtype


def test_a_tokenizer_is_loaded_once_until_its_files_change(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    first = models.load_tokenizer(str(folder))
    assert models.load_tokenizer(str(folder)) is first  # a tune trial or a later stage gets the same one
    settings = folder / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "model_max_length": 77}))
    second = models.load_tokenizer(str(folder))
    assert second is not first and second.model_max_length == 77 and first.model_max_length != 77


def test_a_bpe_tokenizer_asking_for_cleanup_decodes_the_same_without_asking(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    settings = folder / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "clean_up_tokenization_spaces": True}))
    tokenizer = models.load_tokenizer(str(folder))
    ids = tokenizer("a blue mug , made of clay .", add_special_tokens=False)["input_ids"]
    assert tokenizer.clean_up_tokenization_spaces is False  # transformers warned, once a process, that it skips it
    assert tokenizer.decode(ids) == "a blue mug , made of clay ."  # as it decoded: BPE never ran the cleanup


@pytest.mark.real_model
def test_embedded_smollm2_trains_with_nf4_and_generates(run_cli, tmp_path):
    code, _, err = run_cli("train", "quickstart", "--set", "train.max_steps=2", "--set", "train.eval_steps=2",
                           "--set", "data.builtin_rows=40", "--set", "train.batch_size=2")
    assert code == 0, err
    [run] = runs_of()
    assert run.info.status == "FINISHED" and run.data.params["model.quantization"] == "nf4"
    cfg = load_config("quickstart")
    model, tokenizer = models.load_model(cfg, models.resolve_model_path(EMBEDDED_MODEL))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    adapter = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter",
                                                  dst_path=str(tmp_path))
    model = models.load_adapter(model, adapter)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Describe a blue mug."}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 3


@pytest.mark.real_model
def test_gguf_file_converts_once_to_a_cached_folder(tmp_path, monkeypatch):
    gguf = models.embedded_gguf()
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "cache"))
    folder = models.resolve_model_path(str(gguf))
    assert (tmp_path / "cache" / "models").is_dir() and folder.startswith(str(tmp_path / "cache"))
    tokenizer = models.load_tokenizer(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    mtime = (Path(folder) / "config.json").stat().st_mtime
    assert models.resolve_model_path(str(gguf)) == folder
    assert (Path(folder) / "config.json").stat().st_mtime == mtime


def attention_config(tiny_llama, kind: str = "causal"):
    return from_dict({"name": "m", "data": {"path": "x", "max_length": 32},
                      "model": {"name": str(tiny_llama), "quantization": "none", "dtype": "fp32", "kind": kind},
                      "train": {"batch_size": 2}, "lora": {"r": 2}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU lever: faster_cpu_attention does nothing on a GPU machine")
def test_training_attention_is_eager_only_where_it_measures_faster(tiny_llama, monkeypatch):
    """faster_cpu_attention times both at the training shape: with sdpa made 50 ms slower it picks eager (and the
    model then trains through eager attention); for a training that is not causal it changes nothing."""
    import time

    cfg = attention_config(tiny_llama)
    model = models.attach_lora(models.load_model(cfg, str(tiny_llama))[0], cfg)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: time.sleep(0.05) or sdpa(*a, **k))
    models.eager_is_faster.cache_clear()  # measure now, with the slowed sdpa
    assert models.faster_cpu_attention(model, cfg) == "eager"
    assert model.get_base_model().config._attn_implementation == "eager"
    monkeypatch.undo()
    models.eager_is_faster.cache_clear()  # the slowed measurement is not kept for other tests
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[1, 2, 3, 4]])}
    assert torch.isfinite(model(**batch).loss)
    cfg = attention_config(tiny_llama, kind="seq2seq")
    assert models.faster_cpu_attention(model, cfg) == "eager"  # not a causal training: nothing measured or changed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU lever: attach_lora keeps PEFT's casts on a GPU machine")
def test_under_cpu_autocast_lora_inputs_skip_peft_casts_with_the_same_loss_and_gradients(tiny_llama):
    """In a bf16 model with fp32 adapter weights, PEFT casts each LoRA input to fp32 and autocast casts it back:
    attach_lora skips that cast while CPU autocast is on (the dropout sees bf16), giving the same loss and
    gradients as PEFT's cast; without autocast (validation loss) PEFT still casts, so the forward runs."""
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(tiny_llama), "quantization": "none",
                                                                    "dtype": "bf16"},
                     "lora": {"r": 2, "dropout": 0.1, "target_modules": "all-linear"}})
    model = models.attach_lora(models.load_model(cfg, str(tiny_llama))[0], cfg).train()
    for module in model.modules():  # this lever alone: PEFT's forward, which calls the dropout hooks below
        vars(module).pop("forward", None)
    seen = []
    for module in model.modules():
        for dropout in getattr(module, "lora_dropout", {}).values():
            dropout.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
            dropout.shared = None  # PEFT's casts make one input per layer: one mask each in both arms, drawn alike
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6]]), "labels": torch.tensor([[1, 2, 3, 4, 5, 6]])}

    def loss_and_gradients(peft_casts: bool):
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = True if peft_casts else models.CastUnlessAutocast()
        model.zero_grad()
        seen.clear()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad], set(seen)

    assert models.skip_input_casts_under_autocast(model) == 14  # the tiny Llama: 2 layers x 7 linears
    ours, peft_way = loss_and_gradients(peft_casts=False), loss_and_gradients(peft_casts=True)
    assert ours[2] == {torch.bfloat16} and peft_way[2] == {torch.float32}
    assert ours[0] == peft_way[0]
    assert all(torch.equal(a, b) for a, b in zip(ours[1], peft_way[1]))
    loss_and_gradients(peft_casts=False)
    seen.clear()
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**batch).loss)
    assert set(seen) == {torch.float32} and len(seen) == 14  # no autocast: PEFT casts to the adapter's fp32


def random_adapter(base_path, folder):
    """An adapter on the tiny base with random B matrices (PEFT starts them at zero: a merge would change nothing)."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("merge_dtype", ["fp32", "bf16"])
def test_a_merge_runs_on_the_cpu_and_equals_a_merge_in_fp32(tiny_llama, tmp_path, monkeypatch, merge_dtype):
    """Every weight as PEFT's merge of the fp32 base rounds it, and nothing goes to a GPU even when one is visible
    (an 8B base in fp32 would not fit a 24 GB card)."""
    import peft
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(tiny_llama, tmp_path / "adapter")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[merge_dtype]
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                               str(adapter)).merge_and_unload().to(dtype).state_dict()
    cfg = from_dict({"name": "tiny", "model": {"name": str(tiny_llama), "dtype": "fp32"}, "data": {"path": "x.jsonl"},
                     "registry": {"merge_dtype": merge_dtype}})
    from loraflow.models import loading

    with monkeypatch.context() as patched:
        patched.setattr(loading, "default_device", lambda: "cuda")  # as on a GPU machine: moving there fails here
        merged_dir = models.merge_adapter(cfg, str(tiny_llama), adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).state_dict()
    assert merged.keys() == reference.keys()
    changed = [name for name in reference if "proj" in name and not torch.equal(reference[name], merged[name])]
    assert not changed, changed
    assert all(merged[name].dtype == dtype for name in merged)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"].to(dtype),
                           merged["model.layers.0.self_attn.q_proj.weight"])  # the adapter did change the weights
