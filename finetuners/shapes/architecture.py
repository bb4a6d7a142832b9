"""Architectures of the tiny Shapes Stable-Diffusion pipeline, all standard diffusers/transformers classes.

The pipeline is an ordinary ``StableDiffusionPipeline`` folder: a CLIP tokenizer and text encoder, an
``AutoencoderKL`` (32x32 RGB <-> 4x8x8 latents), a ``UNet2DConditionModel`` and a ``DDIMScheduler`` with
SD's scaled-linear schedule. Only the sizes are small.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .world import IMAGE_SIZE, VOCABULARY

MAX_TOKENS = 24  # tokenizer.model_max_length: the longest caption is 12 tokens with BOS/EOS
TEXT_DIM = 64
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 4

# SD 1.x noise schedule (scaled-linear betas), so every sampler setting carries over unchanged.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the lowest-ranked adjacent pair."""
    while len(pieces) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def _bpe_files(words: tuple[str, ...]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """A CLIP byte-level BPE vocabulary in which every world word is one token.

    The base alphabet (lower-case letters, digits, a little punctuation, each also with the end-of-word
    marker) keeps any other word encodable character by character. For each vocabulary word, merges
    are appended that join whatever pieces the earlier merges leave; appended merges rank last, so they
    never change how an earlier word is split.
    """
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-!?")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    return {t: i for i, t in enumerate(tokens)}, merges


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe_files(VOCABULARY)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    tok.save_pretrained(folder)
    return tok


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_DIM,
    )
    return CLIPTextModel(config)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)
