"""A model with a LoRA of its own, ``BASE+LORA`` (SD 1.5 + LCM-LoRA is the real case): loaded through diffusers'
``load_lora_weights`` and fused, so it samples exactly as the LoRA-carrying pipeline does, trains and resumes as
one model, and refuses bad input in words. Built on the tiny random pipeline; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finetuners.errors import UserError


def _write_lora(pipeline_dir: Path, folder: Path, rank: int, seed: int) -> Path:
    """A LoRA for the tiny UNet with non-zero up-projections (a fresh peft LoRA is the identity), saved in
    diffusers' format."""
    from finetuners.lora import add_lora, save_lora
    from finetuners.models import load_model

    pipe = load_model(str(pipeline_dir), "cpu")
    add_lora(pipe.unet, rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    save_lora(pipe.unet, folder)
    return folder


@pytest.fixture(scope="module")
def lcm_lora(random_pipeline_dir, tmp_path_factory) -> Path:
    return _write_lora(random_pipeline_dir, tmp_path_factory.mktemp("loras") / "lcm-lora-tiny", rank=2, seed=1)


def _eps(unet, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen)
    cond = torch.randn(2, 8, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 999]), encoder_hidden_states=cond).sample


def test_a_fused_lora_predicts_as_the_lora_pipeline_and_lcm_switches_the_scheduler(random_pipeline_dir, lcm_lora):
    from diffusers import LCMScheduler

    from finetuners.lora import load_lora
    from finetuners.models import load_model, model_defaults

    fused = load_model(f"{random_pipeline_dir}+{lcm_lora}", "cpu")
    carrying = load_model(str(random_pipeline_dir), "cpu")
    load_lora(carrying, lcm_lora)  # the same LoRA as a live adapter (diffusers' own path)
    base = load_model(str(random_pipeline_dir), "cpu")

    assert not any("lora" in k for k in fused.unet.state_dict())  # fused: no adapter layers left behind
    assert torch.allclose(_eps(fused.unet), _eps(carrying.unet), atol=1e-5)
    assert (_eps(fused.unet) - _eps(base.unet)).abs().max() > 1e-2  # the LoRA changes the prediction
    assert isinstance(fused.scheduler, LCMScheduler) and not isinstance(base.scheduler, LCMScheduler)
    assert model_defaults(fused).sampler == "lcm" and model_defaults(fused).steps == 4
    # The Shapes folder records its own defaults (20 DDIM steps); with an LCM-LoRA fused in it is an LCM model.
    shapes = load_model(f"shapes+{lcm_lora}", "cpu")  # same UNet architecture as the random pipeline
    assert model_defaults(shapes).sampler == "lcm" and model_defaults(load_model("shapes", "cpu")).sampler != "lcm"


def test_a_lora_named_otherwise_keeps_the_scheduler(random_pipeline_dir, lcm_lora, tmp_path):
    from finetuners.models import load_model

    plain = tmp_path / "style-lora"
    shutil.copytree(lcm_lora, plain)
    file = next(plain.glob("*.safetensors"))
    pipe = load_model(f"{random_pipeline_dir}+{file}", "cpu")  # a file works as well as its folder
    stored = json.loads((random_pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    assert type(pipe.scheduler).__name__ == stored["_class_name"] != "LCMScheduler"


def test_bad_lora_specs_are_refused_in_words(random_pipeline_dir, lcm_lora, tmp_path):
    from finetuners.models import load_model, resolve_model_path

    empty = tmp_path / "empty-lora"
    empty.mkdir()
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"not safetensors")
    for spec, message in [
        (f"{random_pipeline_dir}+", "BASE\\+LORA"),
        (f"+{lcm_lora}", "BASE\\+LORA"),
        (f"{random_pipeline_dir}+{tmp_path / 'nope'}", "does not exist"),
        (f"{random_pipeline_dir}+{empty}", "holds 0 .safetensors files"),
        (f"{random_pipeline_dir}+{pickled}", "only safetensors"),
        (f"{tmp_path / 'no-base'}+{lcm_lora}", "does not exist"),
        (f"{random_pipeline_dir}+someone/some-lora", "not in the local Hugging Face cache"),
        (f"{random_pipeline_dir}+a\x00b", "LoRA path contains a NUL byte"),
        (f"a\x00b+{lcm_lora}", "model path contains a NUL byte"),  # the base is checked first
        ("x" * 5000 + f"+{lcm_lora}", "model path is too long"),
    ]:
        with pytest.raises(UserError, match=message):
            resolve_model_path(spec)
        with pytest.raises(UserError, match=message):
            load_model(spec, "cpu")


def test_a_run_on_a_lora_model_trains_reloads_and_notices_a_changed_lora(random_pipeline_dir, lcm_lora, tmp_path):
    from finetuners.runs import checkpoint_ref, list_checkpoints, load_checkpoint_pipeline, spec_fingerprint
    from finetuners.sdpo import SDPOConfig
    from finetuners.trainer import TrainConfig, train

    lora = tmp_path / "lcm-lora-run"
    shutil.copytree(lcm_lora, lora)
    spec = f"{random_pipeline_dir}+{lora}"
    algo = SDPOConfig.preset("shapes", model=spec, reward="jpeg-compressibility", num_steps=2, sample_batch_size=2,
                             num_batches_per_epoch=1, train_batch_size=2, grad_accum=1, num_epochs=1, eval_steps=(1,),
                             buffer_size=4, min_count=2)  # fmt: skip
    runs = tmp_path / "runs"
    train(runs / "on-lora", TrainConfig(method="sdpo", algo=algo, num_eval_prompts=2, eval_every=1))
    record = json.loads((runs / "on-lora" / "config.json").read_text())
    assert record["model_fingerprint"] == spec_fingerprint(spec) != spec_fingerprint(str(random_pipeline_dir))

    ref = checkpoint_ref("on-lora", list_checkpoints(runs / "on-lora")[-1][0])
    pipe = load_checkpoint_pipeline(runs, ref, "cpu")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"  # the checkpoint sits on the LoRA model it trained on

    _write_lora(random_pipeline_dir, lora, rank=4, seed=2)  # the model's LoRA replaced after the run
    with pytest.raises(UserError, match="has changed"):
        load_checkpoint_pipeline(runs, ref, "cpu")
    with pytest.raises(UserError, match="has changed"):
        train(runs / "on-lora", resume=True)


def test_the_sample_tab_takes_a_lora_model_typed_in(lcm_lora, tmp_path):
    from ui.backend import Backend, Settings
    from ui.sample_tab import on_model_change, run_sample

    backend = Backend(Settings(model="shapes", device="cpu", data_dir=tmp_path))
    spec = f"shapes+{lcm_lora}"
    assert on_model_change(backend, spec) == (4, "lcm", 1.0, "")  # an LCM model now: 4 LCM steps, no guidance
    view = run_sample(backend, spec, "a red circle", "", 4, "lcm", 0.0, 1.0, 0, 1)
    assert len(view.images) == 1 and "4 steps" in view.info
    steps, sampler, guidance, error = on_model_change(backend, f"shapes+{tmp_path / 'missing'}")
    assert "does not exist" in error


def test_an_lcm_model_fine_tunes_with_lcm_steps(random_pipeline_dir, lcm_lora, tmp_path):
    """The Fine-tune tab and the CLI train an LCM model as it samples: LCM steps as SDPO's and DDPO's policy and
    LCM evaluation; the gradient methods keep their DDIM chain."""
    from finetuners.__main__ import main
    from finetuners.runs import read_json
    from ui.backend import Backend, Settings
    from ui.finetune_tab import make_config

    spec = f"{random_pipeline_dir}+{lcm_lora}"
    backend = Backend(Settings(model=spec, device="cpu", data_dir=tmp_path / "data"))
    form = dict(reward="shapes-probe", learning_rate=3e-4, batch=2, epochs=1, train_steps=2, eval_steps=[1, 2],
                adapter="LoRA", lora_rank=2)  # fmt: skip
    for method, train_sampler in (("SDPO", "lcm"), ("DDPO", "lcm"), ("RLR", "ddim")):
        config = make_config(backend, method=method, **form)
        assert (config.algo.train_sampler, config.algo.eval_sampler) == (train_sampler, "lcm"), method
    run = tmp_path / "runs" / "cli-lcm"
    assert main(["train", "--run", str(run), "--model", spec, "--reward", "jpeg-compressibility", "--epochs", "1",
                 "--batch", "2", "--batches", "1", "--train-batch", "2", "--grad-accum", "1", "--train-steps", "2",
                 "--eval-steps", "1", "--eval-prompts", "2"]) == 0  # fmt: skip
    algo = read_json(run / "config.json")["config"]["algo"]
    assert (algo["train_sampler"], algo["eval_sampler"]) == ("lcm", "lcm")
    from finetuners.jobs import RunManager
    from ui.finetune_tab import describe_status

    info = RunManager(run.parent).info("cli-lcm")  # what the Fine-tune tab says of the run
    assert info.train_sampler == "lcm" and "SDPO on jpeg-compressibility (lora, LCM steps)" in describe_status(info)
