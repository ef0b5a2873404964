"""Idefics2Model (vision -> connector -> merged into the text embeddings -> Mistral) and the LM head on top."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, SlotKVCache
from .config import ATTENTION_IMPLEMENTATIONS, Idefics2Config
from .connector import Idefics2Connector, Idefics2PerceiverAttention
from .layers import Linear, RMSNorm
from .outputs import Idefics2CausalLMOutput, Idefics2ModelOutput
from .text import MistralAttention, MistralModel, RotaryEmbedding
from .vision import Idefics2VisionAttention, Idefics2VisionTransformer

_ATTENTION_MODULES = (Idefics2VisionAttention, Idefics2PerceiverAttention, MistralAttention)


def check_attn_implementation(name: str) -> None:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r} is unknown; expected one of {ATTENTION_IMPLEMENTATIONS}")
    if name == "flash_attention_2":
        from .flash import flash_attention_available

        reason = flash_attention_available()
        if reason:
            raise ValueError(f"attn_implementation='flash_attention_2' is not available: {reason}")


_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "constant_", "trunc_normal_")


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers.

    Parameters get shapes and dtypes but no storage; a checkpoint then provides every tensor. (Initialising
    meta tensors is not free: torch routes it through Python decompositions.)
    """
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


class Idefics2PreTrainedModel(nn.Module):
    """Weight initialisation, attention-backend switch and checkpoint I/O shared by both model classes."""

    config: Idefics2Config
    # What this class's state-dict keys lack compared with the full model's ("model." for the base model).
    checkpoint_prefix = ""

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """Where inputs go: the main device of a model spread by a device_map dict, else its parameters'."""
        main = self.__dict__.get("_main_device")
        return main if main is not None else next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def init_weights(self) -> None:
        """Random initialisation (normal(0, initializer_range)), norms at one, latents at one."""
        if next(self.parameters()).is_meta:
            return  # built only to receive checkpoint tensors: nothing to initialise
        std = self.config.text_config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None and module.weight.device.type != "meta":
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for name, param in self.named_parameters():
            if name.endswith("perceiver_resampler.latents"):
                nn.init.ones_(param)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute non-persistent buffers, e.g. after building on the meta device."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                fresh = RotaryEmbedding(self.config.text_config)
                module.inv_freq = fresh.inv_freq.to(device or "cpu")

    def tie_weights(self) -> None:
        """Share lm_head and input embeddings when the config asks for it (no-op for the base model)."""

    def set_attn_implementation(self, name: str) -> None:
        check_attn_implementation(name)
        self.config.attn_implementation = name
        for module in self.modules():
            if isinstance(module, _ATTENTION_MODULES):
                module.attn_implementation = name

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load `config.json` + `model.safetensors` (or shards). See `idefics2.checkpoint.load_pretrained`."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `config.json` and safetensors (sharded above `max_shard_size`) in the published layout."""
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, **kwargs)


class Idefics2Model(Idefics2PreTrainedModel):
    checkpoint_prefix = "model."

    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_model = Idefics2VisionTransformer(config.vision_config)
        self.connector = Idefics2Connector(config)
        self.text_model = MistralModel(config.text_config)
        self.init_weights()
        self.set_attn_implementation(config.attn_implementation)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.embed_tokens = value

    # ---- images --------------------------------------------------------------------------------------------
    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the real images of a padded batch.

        pixel_values [B, N, C, H, W] (all-zero slots are padding images and are skipped),
        pixel_attention_mask [B, N, H, W] (1 on real pixels). Returns features [I, n_latents, D_text] of the
        I real images in sample-major order, and the number of real images per sample [B].
        """
        pixel_values, pixel_attention_mask = self._check_pixels(pixel_values, pixel_attention_mask)
        batch, num_images = pixel_values.shape[:2]
        pixels = pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        pixels = pixels.reshape(batch * num_images, *pixels.shape[2:])
        real = pixels.reshape(pixels.shape[0], -1).ne(0).any(dim=1)  # padding images are exactly 0
        counts = real.view(batch, num_images).sum(dim=1)
        pixels = pixels[real]
        if pixels.shape[0] == 0:
            return pixels.new_zeros(0, self.config.image_seq_len, self.config.text_config.hidden_size), counts
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool, device=pixels.device)
        else:
            pixel_mask = pixel_attention_mask.reshape(batch * num_images, *pixel_attention_mask.shape[2:])[real]
        # A patch is valid only if all of its pixels are (partial border patches are dropped).
        p = self.config.vision_config.patch_size
        h, w = pixel_mask.shape[1] // p, pixel_mask.shape[2] // p
        patch_mask = pixel_mask[:, : h * p, : w * p].reshape(-1, h, p, w, p).bool().all(dim=4).all(dim=2)
        return self.encode_patches(pixels, patch_mask), counts

    def encode_patches(self, pixels: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """Vision tower + connector: pixels [I, C, H, W], patch mask [I, h, w] -> features [I, n_latents, D].

        Images padded to a common size (the crops of a split image: four quarters and the whole one) run in
        groups of equal valid extent, cropped to it, instead of as one padded batch: the padded patches would cost
        MLP rows and quadratic attention for nothing (the crops of a 1000x800 image are 41% real pixels, and
        the padded batch spent 4x the needed attention). The math of each image is unchanged (its padded patches
        are masked out of every attention and position id either way); only summation order may differ. Valid
        patches that do not form a top-left rectangle keep the padded batch."""
        p = self.config.vision_config.patch_size
        num_images, h, w = patch_mask.shape
        rows, cols = patch_mask[:, :, 0].sum(dim=1), patch_mask[:, 0, :].sum(dim=1)
        grid_h = torch.arange(h, device=patch_mask.device)[None, :, None] < rows[:, None, None]
        grid_w = torch.arange(w, device=patch_mask.device)[None, None, :] < cols[:, None, None]
        extents = list(zip(rows.tolist(), cols.tolist()))
        if all(e == (h, w) for e in extents) or not torch.equal(grid_h & grid_w, patch_mask) \
                or min(r * c for r, c in extents) == 0:
            hidden = self.vision_model(pixels, patch_mask)
            return self.connector(hidden, patch_mask.reshape(num_images, -1))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, extent in enumerate(extents):
            groups.setdefault(extent, []).append(i)
        order, parts = [], []
        for (r, c), members in groups.items():
            index = torch.tensor(members, device=pixels.device)
            hidden = self.vision_model(pixels[index, :, : r * p, : c * p], None)
            parts.append(self.connector(hidden, torch.ones(len(members), r * c, dtype=torch.bool, device=pixels.device)))
            order.extend(members)
        features = torch.cat(parts)
        return features[torch.argsort(torch.tensor(order, device=features.device))]

    def _check_pixels(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        channels = self.config.vision_config.num_channels
        if pixel_values.dim() != 5 or pixel_values.shape[2] != channels:
            raise ValueError(
                "pixel_values must have shape (batch, num_images, channels, height, width) with "
                f"channels={channels}, as the processor returns; got shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point (normalised pixels), got {pixel_values.dtype}")
        if pixel_attention_mask is not None:
            expected = (*pixel_values.shape[:2], *pixel_values.shape[3:])
            if tuple(pixel_attention_mask.shape) != expected:
                raise ValueError(
                    f"pixel_attention_mask must have shape (batch, num_images, height, width) = {expected} to "
                    f"match pixel_values {tuple(pixel_values.shape)}; got {tuple(pixel_attention_mask.shape)}"
                )
        return pixel_values, pixel_attention_mask

    def check_image_tokens(self, input_ids: torch.Tensor, images_per_sample: torch.Tensor) -> None:
        """Each sample must hold n_latents `<image>` tokens per image it has (a per-sample check: a total count
        could let one sample's features land in another's slots)."""
        n_latents = self.config.image_seq_len
        tokens_per_sample = (input_ids == self.config.image_token_id).sum(dim=1)
        expected = images_per_sample.to(tokens_per_sample.device) * n_latents
        bad = (tokens_per_sample != expected).nonzero().flatten().tolist()
        if bad:
            b = bad[0]
            raise ValueError(
                f"Image features and image tokens do not match in sample {b}: input_ids has "
                f"{int(tokens_per_sample[b])} image tokens (id {self.config.image_token_id}) but the sample has "
                f"{int(images_per_sample[b])} image(s) x {n_latents} latents = {int(expected[b])}. Build prompts "
                "with the processor, which expands each <image> to the right number of tokens."
            )

    def merge_image_features(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        images_per_sample: torch.Tensor | None,
    ) -> torch.Tensor:
        """Write image features into the `<image>` token slots, row-major (sample by sample, left to right)."""
        n_latents = self.config.image_seq_len
        hidden = inputs_embeds.shape[-1]
        features = features.reshape(-1, hidden).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        is_image = input_ids == self.config.image_token_id
        tokens_per_sample = is_image.sum(dim=1)
        if images_per_sample is not None:
            self.check_image_tokens(input_ids, images_per_sample)
        elif int(tokens_per_sample.sum()) != features.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: input_ids has {int(tokens_per_sample.sum())} image "
                f"tokens (id {self.config.image_token_id}) but {features.shape[0]} feature rows were given "
                f"({features.shape[0] // max(n_latents, 1)} image(s) x {n_latents} latents)"
            )
        return inputs_embeds.masked_scatter(is_image.unsqueeze(-1).to(inputs_embeds.device), features)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_hidden_states: torch.Tensor | list[torch.Tensor] | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: KVCache | None = None,
    ) -> Idefics2ModelOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("Pass either pixel_values or image_hidden_states, not both")
        past_key_values = past_key_values if past_key_values is not None else cache
        if past_key_values is not None and not isinstance(past_key_values, (KVCache, SlotKVCache)):
            raise TypeError(
                f"past_key_values must be the KVCache returned by an earlier call, got {type(past_key_values).__name__}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.text_model.gradient_checkpointing:
            use_cache = False

        if input_ids is not None:
            input_ids = self._check_input_ids(input_ids)
            inputs_embeds = self.text_model.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be (batch, seq, hidden), got shape {tuple(inputs_embeds.shape)}")
        batch, seq_len = inputs_embeds.shape[:2]
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != batch):
            raise ValueError(
                f"attention_mask must be (batch={batch}, past+new tokens), got shape {tuple(attention_mask.shape)}"
            )

        features, counts = None, None
        if pixel_values is not None:
            if pixel_values.dim() == 5 and pixel_values.shape[0] != batch:
                raise ValueError(
                    f"pixel_values has {pixel_values.shape[0]} samples but the text batch has {batch}"
                )
            features, counts = self.get_image_features(pixel_values, pixel_attention_mask)
        elif image_hidden_states is not None:
            features = (
                torch.cat(list(image_hidden_states)) if isinstance(image_hidden_states, (list, tuple))
                else image_hidden_states
            )
        if features is not None:
            if input_ids is None:
                image_embedding = self.text_model.embed_tokens.weight[self.config.image_token_id]
                image_embedding = image_embedding.to(inputs_embeds.device)
                image_ids = (inputs_embeds == image_embedding).all(-1)
                ids = torch.where(image_ids, self.config.image_token_id, -1)
            else:
                ids = input_ids
            inputs_embeds = self.merge_image_features(ids, inputs_embeds, features, counts)

        if use_cache and past_key_values is None:
            # Each layer's part of the cache on that layer's device when a device_map dict spreads the decoder.
            devices = getattr(self.text_model, "layer_devices", None) or inputs_embeds.device
            past_key_values = self.text_model.new_cache(batch, seq_len, inputs_embeds.dtype, devices)
        hidden, all_hidden, all_attn = self.text_model(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values if use_cache else None,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
        )
        out = Idefics2ModelOutput(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden,
            attentions=all_attn,
            image_hidden_states=features,
        )
        return out if return_dict is not False else out.to_tuple()

    def _check_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        embed = self.text_model.embed_tokens
        # A device_map dict puts a hook on the embedding that moves its input; without one, torch would fail
        # deep inside index_select.
        if not embed._forward_pre_hooks and input_ids.device != embed.weight.device:
            raise ValueError(
                f"input_ids are on {input_ids.device} but the model is on {embed.weight.device}: "
                f"move the inputs first, e.g. inputs.to(model.device)"
            )
        vocab = self.config.text_config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(
                f"input_ids contain ids outside the vocabulary [0, {vocab}): min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}"
            )
        return input_ids


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy in float32; -100 labels are ignored; mean over counted targets.

    With `positions` (the sequence positions `logits_to_keep` selected), logits[:, i] predicts
    labels[:, positions[i] + 1] of the full-length labels."""
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    if positions is not None:
        shift_labels = shift_labels[:, positions.to(logits.device)]
    logits = logits.float().reshape(-1, logits.shape[-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, shift_labels.reshape(-1), ignore_index=-100, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


class Idefics2ForConditionalGeneration(Idefics2PreTrainedModel):
    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Idefics2Model(config)
        self.lm_head = Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if not self.lm_head.weight.is_meta:
            nn.init.normal_(self.lm_head.weight, std=config.text_config.initializer_range)
        self.generation_config = None
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head's weight with the input embeddings when the config asks for it."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None):
        return self.model.get_image_features(pixel_values, pixel_attention_mask)

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any):
        """Greedy / sampled / beam generation; see `idefics2.generation.generate` for the arguments."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_hidden_states: torch.Tensor | list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: KVCache | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> Idefics2CausalLMOutput | tuple:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            image_hidden_states=image_hidden_states,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=cache,
        )
        hidden = out.last_hidden_state
        seq_len = hidden.shape[1]
        positions = None  # the kept positions, where logits_to_keep selects some
        if isinstance(logits_to_keep, int):
            if 0 < logits_to_keep < seq_len:
                hidden = hidden[:, -logits_to_keep:]
                positions = torch.arange(seq_len - logits_to_keep, seq_len, device=hidden.device)
        else:
            positions = logits_to_keep.to(hidden.device)
            hidden = hidden[:, positions]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if labels.shape == logits.shape[:2]:  # labels of the kept positions (transformers' reading)
                loss = causal_lm_loss(logits, labels, num_items_in_batch)
            elif labels.shape == (logits.shape[0], seq_len):
                # Full-length labels with logits_to_keep: the loss counts the kept positions. A trainer keeps only
                # those with a target (`idefics2.training.target_positions`): the same loss, fewer logits.
                loss = causal_lm_loss(logits, labels, num_items_in_batch, positions)
            else:
                raise ValueError(f"labels must be (batch, seq) = {(logits.shape[0], seq_len)}, or the kept "
                                 f"{tuple(logits.shape[:2])} with logits_to_keep; got {tuple(labels.shape)}")
        result = Idefics2CausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_hidden_states=out.image_hidden_states,
        )
        return result if return_dict is not False else result.to_tuple()
