"""Train the embedded Shapes pipeline and its probe from scratch.

    python -m finetuners.shapes.train --preset cpu --out assets          # 2 CPU cores, see docs/SHAPES.md
    python -m finetuners.shapes.train --preset full --device cuda --out assets

Stages, all from one seed:
1. render a Shapes dataset (``world.make_dataset``);
2. train the ``AutoencoderKL`` (L1 + MSE + tiny KL) and set ``scaling_factor`` = 1 / std(latents);
3. train the probe on real images and VAE reconstructions (so it reads decoded images too);
4. train the UNet and the text encoder jointly on the ε-prediction loss, 10 % empty captions (for
   classifier-free guidance), with an EMA of the weights;
5. evaluate prompt-following accuracy at 20 DDIM steps and write the pipeline folder
   (``StableDiffusionPipeline.save_pretrained``, safetensors only), the probe and ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel

from ..models import DEFAULTS_FILE, ModelDefaults
from . import architecture as arch
from .probe import ShapesProbe, probe_loss, prompt_accuracy
from .world import cell_targets, eval_prompts, make_dataset, parse_prompt, partial_captions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    n_images: int = 60_000  # rendered once; batches are drawn from it
    vae_steps: int = 1200
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # as in SD's VAE: a regulariser, not a real prior
    probe_steps: int = 1200
    probe_batch: int = 128
    probe_lr: float = 2e-3
    unet_steps: int = 9000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (arXiv 2303.09556): faster convergence
    unet_warmup: int = 300
    caption_dropout: float = 0.1  # P(empty caption): trains the unconditional branch for CFG
    ema_decay: float = 0.999
    eval_prompts: int = 256
    probe_heldout: int = 2000  # images the probe's held-out accuracy is read on
    eval_steps: int = 20
    save_every: int = 1500  # intermediate pipeline saves (EMA weights), so a long run is never all-or-nothing
    max_minutes: float = 0.0  # stop the UNet stage early past this wall-clock budget (0 = no budget)
    # >1: at SNR < 1 the ε loss is weighted by min(1/SNR, this), i.e. by the x0 error capped here. The layout
    # (which cell holds what) is decided at high noise, where a plain ε loss barely sees x0 (its x0 error is
    # scaled by SNR, 0.005 at t = 999): a relation word, which only constrains the layout, went unlearnt by the
    # plain loss for 22 000 steps (docs/SHAPES.md).
    high_noise_weight: float = 1.0
    relation_share: float = 0.0  # >0: this fraction of each UNet batch is drawn from relation captions only
    # >0: a two-object image in a UNet batch is captioned with one of its objects only ("a red circle") with this
    # probability, as real captions leave things out. Then a one-object caption has density on two-object images,
    # which SuperDiff's AND needs to compose two prompts (docs/BENCHMARKS.md, "Superpose").
    partial_caption_share: float = 0.0
    # >0: this fraction of the dataset (and of the evaluation prompts) is three-object captions, the template outside
    # the default mix (world.random_spec); 0 renders exactly the default world.
    three_object_share: float = 0.0
    resume_probe_steps: int = 0  # with --resume: continue the earlier probe this many steps (0 keeps it as it is)


SHAPES_DEFAULTS = ModelDefaults(sampler="ddim", steps=20, guidance=3.0)

PRESETS = {
    "smoke": TrainConfig(  # every stage, each a few small steps: a test of the script, not of the weights
        n_images=128,
        vae_steps=10,
        vae_batch=8,
        probe_steps=10,
        probe_batch=16,
        unet_steps=20,
        unet_batch=8,
        eval_prompts=12,
        eval_steps=4,
        probe_heldout=64,
    ),
    "cpu": TrainConfig(),  # about an hour on 2 CPU cores
    "full": TrainConfig(
        n_images=100_000,
        vae_steps=4000,
        vae_batch=128,
        probe_steps=3000,
        unet_steps=20_000,
        unet_batch=256,
        unet_lr=4e-4,
        unet_warmup=1000,
        ema_decay=0.9995,
    ),  # fmt: skip; the shipped weights: about 7 minutes on one H200
}


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def loss_weight(snr: torch.Tensor, min_snr_gamma: float, high_noise_weight: float = 1.0) -> torch.Tensor:
    """Weight of the per-sample ε loss at signal-to-noise ratio ``snr``.

    Above SNR 1 it is Min-SNR-γ in its ε-prediction form, min(SNR, γ) / SNR. Below SNR 1 it is the x0 error's
    weight 1 / SNR (since |x̂0 - x0|² = |ε̂ - ε|² / SNR), capped at ``high_noise_weight``; a cap of 1 is
    plain ε loss there. The two meet at SNR 1 whenever γ ≥ 1.
    """
    return snr.clamp(max=min_snr_gamma) / snr * (1 / snr).clamp(1.0, max(1.0, high_noise_weight))


def partial_caption_ids(specs: list, tokenizer) -> torch.Tensor:
    """Token ids [N, 2, MAX_TOKENS] of each caption's partial captions (``world.partial_captions``): object 1
    alone and object 2 alone; for a one-object caption, its object alone (no position) twice. Each distinct
    caption is tokenised once."""
    partial = [(partial_captions(spec) * 2)[:2] for spec in specs]
    unique = sorted({c for pair in partial for c in pair})
    ids = tokenizer(unique, padding="max_length", max_length=arch.MAX_TOKENS, return_tensors="pt").input_ids
    row = {c: i for i, c in enumerate(unique)}
    return ids[torch.tensor([[row[c] for c in pair] for pair in partial])]


def _batches(n: int, batch: int, gen: torch.Generator):
    while True:
        yield torch.randint(0, n, (batch,), generator=gen)


def train(config: TrainConfig, out: Path, device: str = "cpu", resume: Path | None = None) -> dict:
    """Run every stage; with ``resume`` (an earlier ``out``), keep its VAE and probe and continue the
    UNet and text encoder from its weights for ``config.unet_steps`` more steps (a fresh LR schedule)."""
    t_start = time.time()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)  # module initialisation; every batch draw uses `gen`
    gen = torch.Generator().manual_seed(config.seed)
    report: dict = {"config": asdict(config), "device": device, "torch": torch.__version__}
    if resume is not None:
        earlier = json.loads((resume / "training.json").read_text()) if (resume / "training.json").exists() else {}
        report["resumed_from"] = earlier | {"path": str(resume)}  # the whole history, one level per stage

    # 1. data ---------------------------------------------------------------------------------------
    data = make_dataset(config.n_images, seed=config.seed, three_share=config.three_object_share)
    images = torch.from_numpy(np.stack([s.image for s in data])).permute(0, 3, 1, 2).contiguous()  # uint8
    captions = [s.caption for s in data]
    targets = [cell_targets(s.objects) for s in data]
    shape_t = torch.from_numpy(np.stack([t[0] for t in targets]))
    color_t = torch.from_numpy(np.stack([t[1] for t in targets]))
    to_unit = lambda idx: images[idx].to(device).float() / 255  # noqa: E731
    log.info("rendered %d images in %.1fs", len(data), time.time() - t_start)

    # 2. VAE ----------------------------------------------------------------------------------------
    if resume is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(resume / "shapes-sd" / "vae", use_safetensors=True).to(device)
    else:
        vae = arch.make_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, config.vae_steps))
    vae_steps = 0 if resume is not None else config.vae_steps
    for step, idx in zip(range(vae_steps), _batches(len(data), config.vae_batch, gen)):
        x = to_unit(idx) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + config.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == config.vae_steps - 1:
            log.info("vae %d/%d loss %.4f", step, config.vae_steps, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        moments = torch.cat(
            [
                vae.encode(to_unit(torch.arange(i, min(i + 512, len(data)))) * 2 - 1).latent_dist.parameters.cpu()
                for i in range(0, len(data), 512)
            ]  # fmt: skip
        )  # [N, 2C, h, w]: mean and log-variance
    mean, logvar = moments.chunk(2, dim=1)
    std = (0.5 * logvar.clamp(-30, 20)).exp()
    if resume is not None:
        scaling = vae.config.scaling_factor
    else:
        scaling = 1.0 / (mean + std * torch.randn(mean.shape, generator=gen)).std().item()
        vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        idx = torch.arange(min(2048, len(data)))
        rec = vae.decode(mean[idx].to(device)).sample.clamp(-1, 1)
        report["vae_psnr_db"] = float(-10 * torch.log10(F.mse_loss((rec + 1) / 2, to_unit(idx))))
    report["vae_scaling_factor"] = scaling
    log.info("vae psnr %.2f dB, scaling_factor %.4f", report["vae_psnr_db"], scaling)

    # 3. probe --------------------------------------------------------------------------------------
    probe = ShapesProbe.load(resume / "shapes-probe", device) if resume is not None else ShapesProbe().to(device)
    probe.requires_grad_(True)
    opt = torch.optim.AdamW(probe.parameters(), lr=config.probe_lr, weight_decay=1e-4)
    probe_steps = config.resume_probe_steps if resume is not None else config.probe_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(100, probe_steps), probe_steps))
    for step, idx in zip(range(probe_steps), _batches(len(data), config.probe_batch, gen)):
        x = to_unit(idx)
        with torch.no_grad():  # half of each batch through the VAE: the probe must read decoded images
            half = len(idx) // 2
            z = mean[idx[:half]].to(device) + std[idx[:half]].to(device) * torch.randn_like(mean[idx[:half]]).to(device)
            x[:half] = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
            x = (x + 0.03 * torch.rand(len(x), 1, 1, 1, device=device) * torch.randn_like(x)).clamp(0, 1)
        loss = probe_loss(*probe(x), shape_t[idx].to(device), color_t[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == probe_steps - 1:
            log.info("probe %d/%d loss %.4f", step, probe_steps, loss.item())
    probe.eval().requires_grad_(False)
    probe.save(out / "shapes-probe")
    held_out = make_dataset(config.probe_heldout, seed=config.seed + 10_000, three_share=config.three_object_share)
    with torch.no_grad():
        x = torch.from_numpy(np.stack([s.image for s in held_out])).permute(0, 3, 1, 2).to(device).float() / 255
        report["probe_heldout_accuracy"] = prompt_accuracy(probe, x, [s.spec for s in held_out]).mean().item()
        x_rec = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
        report["probe_heldout_accuracy_vae"] = prompt_accuracy(probe, x_rec, [s.spec for s in held_out]).mean().item()
    log.info("probe held-out accuracy %.4f (through VAE %.4f)", report["probe_heldout_accuracy"],
             report["probe_heldout_accuracy_vae"])  # fmt: skip

    # 4. UNet + text encoder ------------------------------------------------------------------------
    if resume is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(resume / "shapes-sd" / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(resume / "shapes-sd" / "text_encoder", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(resume / "shapes-sd" / "unet", use_safetensors=True)
        text_encoder, unet = text_encoder.to(device).train(), unet.to(device).train()
    else:
        tokenizer = arch.make_tokenizer(out / "shapes-sd" / "tokenizer")
        text_encoder = arch.make_text_encoder(tokenizer).to(device)
        unet = arch.make_unet().to(device)
    noise_sched = DDPMScheduler(**{k: v for k, v in arch.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod.to(device)
    ids_all = tokenizer(captions, padding="max_length", max_length=arch.MAX_TOKENS, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=arch.MAX_TOKENS, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    lr_at = _lr_lambda(config.unet_warmup, config.unet_steps)
    ema_unet = EMAModel(unet.parameters(), decay=config.ema_decay, foreach=True)
    ema_text = EMAModel(text_encoder.parameters(), decay=config.ema_decay, foreach=True)
    # Batches are drawn on the training device: latent moments, token ids and noise all live there.
    mean_d, std_d, ids_d, empty_d = mean.to(device), std.to(device), ids_all.to(device), empty_ids.to(device)
    dgen = torch.Generator(device).manual_seed(config.seed + 1)
    rel_idx = torch.tensor([i for i, s in enumerate(data) if s.spec.relation], device=device)
    if config.partial_caption_share:
        partial_d = partial_caption_ids([s.spec for s in data], tokenizer).to(device)
        is_pair_d = torch.tensor([len(s.spec.objects) == 2 for s in data], device=device)
    n_rel = round(config.relation_share * config.unet_batch)
    t_unet = time.time()
    # With a wall-clock budget, the cosine schedule follows whichever runs out first: steps or time.
    unet_budget = 60 * config.max_minutes - (t_unet - t_start) if config.max_minutes else 0.0
    steps_done = 0
    for step in range(config.unet_steps):
        frac_time = (time.time() - t_unet) / unet_budget if unet_budget > 0 else 0.0
        eff_step = max(step, int(frac_time * config.unet_steps))
        for group in opt.param_groups:
            group["lr"] = config.unet_lr * lr_at(eff_step)
        idx = torch.randint(0, len(data), (config.unet_batch,), generator=dgen, device=device)
        if n_rel:
            pick = torch.randint(0, len(rel_idx), (n_rel,), generator=dgen, device=device)
            idx = torch.cat([rel_idx[pick], idx[n_rel:]])
        z0 = (mean_d[idx] + std_d[idx] * torch.randn(mean_d[idx].shape, generator=dgen, device=device)) * scaling
        eps = torch.randn(z0.shape, generator=dgen, device=device)
        t = torch.randint(0, 1000, (len(idx),), generator=dgen, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        drop = torch.rand(len(idx), generator=dgen, device=device) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_d, ids_d[idx])
        if config.partial_caption_share:
            part = is_pair_d[idx] & (torch.rand(len(idx), generator=dgen, device=device) < config.partial_caption_share)
            which = torch.randint(0, 2, (len(idx),), generator=dgen, device=device)
            ids = torch.where((part & ~drop)[:, None], partial_d[idx, which], ids)
        hidden = text_encoder(ids).last_hidden_state
        weight = loss_weight(a.flatten() / (1 - a.flatten()), config.min_snr_gamma, config.high_noise_weight)
        loss = (weight * (unet(zt, t, hidden).sample - eps).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        steps_done = step + 1
        if step % 250 == 0 or step == config.unet_steps - 1:
            log.info("unet %d/%d loss %.4f lr %.2e (%.3fs/step)", step, config.unet_steps, loss.item(),
                     opt.param_groups[0]["lr"], (time.time() - t_unet) / (step + 1))  # fmt: skip
        if config.save_every and steps_done % config.save_every == 0:
            _save_pipeline(out, vae, text_encoder, tokenizer, unet, _defaults(config), ema_unet, ema_text)
        if eff_step >= config.unet_steps:
            log.warning("time budget reached at step %d", steps_done)
            break
    report["unet_steps_done"] = steps_done
    report["unet_seconds_per_step"] = (time.time() - t_unet) / max(1, steps_done)
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())

    # 5. save and evaluate --------------------------------------------------------------------------
    pipe = _save_pipeline(out, vae, text_encoder, tokenizer, unet, _defaults(config))
    prompts = eval_prompts(config.eval_prompts, three_share=config.three_object_share)
    for guidance in (1.0, 3.0, 5.0):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            imgs = pipe(prompts, num_inference_steps=config.eval_steps, guidance_scale=guidance, eta=0.0,
                        generator=torch.Generator(device).manual_seed(0), output_type="pt").images  # fmt: skip
            hits = prompt_accuracy(probe, imgs.to(device).float(), prompts)
        acc = hits.mean().item()
        report[f"accuracy_{config.eval_steps}steps_cfg{guidance:g}"] = acc
        kinds = [parse_prompt(p).template for p in prompts]
        report[f"accuracy_by_template_cfg{guidance:g}"] = {
            k: hits[[i for i, kk in enumerate(kinds) if kk == k]].mean().item() for k in sorted(set(kinds))
        }
        log.info("prompt accuracy at %d steps, guidance %g: %.3f", config.eval_steps, guidance, acc)
    report["total_seconds"] = time.time() - t_start
    (out / "training.json").write_text(json.dumps(report, indent=2))
    return report


def _defaults(config) -> ModelDefaults:
    """The sampler defaults recorded beside the pipeline. A model trained on partial captions (shapes-partial) also
    records guidance 1 for SuperDiff, where AND composes two object prompts (docs/BENCHMARKS.md, Superpose)."""
    return replace(SHAPES_DEFAULTS, superdiff_guidance=1.0) if config.partial_caption_share else SHAPES_DEFAULTS


def _save_pipeline(out, vae, text_encoder, tokenizer, unet, defaults, ema_unet=None, ema_text=None):
    """Write the pipeline folder; with EMA models given, save their weights and restore the live ones."""
    for ema, model in ((ema_unet, unet), (ema_text, text_encoder)):
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=arch.make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(out / "shapes-sd", safe_serialization=True)
    (out / "shapes-sd" / DEFAULTS_FILE).write_text(json.dumps(asdict(defaults), indent=2))
    for ema, model in ((ema_unet, unet), (ema_text, text_encoder)):
        if ema is not None:
            ema.restore(model.parameters())
            model.train()
    log.info("saved %s", out / "shapes-sd")
    return pipe


# The preset fields the CLI can override, each with the range it accepts (and the words saying so).
OVERRIDE_RANGES = {
    "unet_steps": (lambda v: v >= 1, "at least 1"),
    "unet_lr": (lambda v: v > 0, "positive"),
    "high_noise_weight": (lambda v: v >= 1, "at least 1 (1 = plain ε loss)"),
    "relation_share": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "partial_caption_share": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "three_object_share": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "resume_probe_steps": (lambda v: v >= 0, "at least 0"),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", type=Path, default=Path("assets"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock budget for the whole run")
    p.add_argument("--unet-steps", type=int, help="override the preset's UNet steps")
    p.add_argument("--unet-lr", type=float, help="override the preset's UNet learning rate")
    p.add_argument("--high-noise-weight", type=float, help="cap of the x0-error weighting at SNR < 1 (1 = off)")
    p.add_argument("--relation-share", type=float, help="fraction of each UNet batch drawn from relation captions")
    p.add_argument("--partial-caption-share", type=float, help="P(a two-object image gets a one-object caption)")
    p.add_argument("--three-object-share", type=float, help="fraction of the data captioned with three objects")
    p.add_argument("--resume-probe-steps", type=int, help="with --resume: continue its probe this many steps")
    p.add_argument("--resume", type=Path, help="continue the UNet of an earlier --out (keeps its VAE and probe)")
    args = p.parse_args(argv)
    overrides = {field: getattr(args, field) for field in OVERRIDE_RANGES if getattr(args, field) is not None}
    for field, value in overrides.items():
        ok, required = OVERRIDE_RANGES[field]
        if not ok(value):
            p.error(f"--{field.replace('_', '-')} must be {required}, got {value}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = replace(PRESETS[args.preset], seed=args.seed, max_minutes=args.max_minutes, **overrides)
    report = train(config, args.out, args.device, resume=args.resume)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
