"""Loading LLaVA-OneVision: real weights from the Hub or a path, or random-init presets such as `tiny-random`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from dycoke.pruning import install_dp_hooks

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
# What the CLI uses by default and the app falls back to: it needs no download.
OFFLINE_DEFAULT = "tiny-random"
TINY_SEED = 0
IMAGE_SIZE = 384
PATCH_SIZE = 14

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>\n{% elif part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# Language and vision sizes of each random-init preset; `tiny-random` and `mini` are CPU-sized, the others real geometry.
# A wide initialisation (0.3) keeps the small random models from collapsing onto one repeated token, so that
# their output depends on the video, which the equivalence and pruning tests need.
PRESETS: dict[str, dict] = {
    "tiny-random": {
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, initializer_range=0.3),
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    },
    "mini": {
        "text": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2, initializer_range=0.3),
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
    },
    "ov-0.5b": {
        "text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=152000),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
    },
    "ov-7b": {
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152128),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
    },
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the cause."""


@dataclass
class LoadedModel:
    model: LlavaOnevisionForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    is_random: bool

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def tokens_per_frame(self) -> int:
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        return ((side + 1) // 2) ** 2

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def describe(self) -> str:
        weights = "random weights, answers are meaningless" if self.is_random else "pretrained weights"
        return f"{self.name} on {self.device.type} ({str(self.dtype).removeprefix('torch.')}, {weights})"


def load(name: str = "tiny-random", device: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """A preset name (`tiny-random`, `mini`, `ov-0.5b`, `ov-7b`: random weights), a Hub id or a local path."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"cannot load '{name}' on cuda: no CUDA device is available; use --device cpu")
    dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
    if name in PRESETS:
        loaded = build_random(name, target, dtype)
    else:
        loaded = _load_pretrained(name, target, dtype)
    install_dp_hooks(loaded.model)
    return loaded


def build_random(preset: str, device: torch.device, dtype: torch.dtype, seed: int = TINY_SEED) -> LoadedModel:
    """Random-init LLaVA-OneVision with the real classes and geometry, deterministic for a given seed."""
    tokenizer = build_tokenizer()
    sizes = PRESETS[preset]
    vocab_size = sizes["text"].get("vocab_size", len(tokenizer))
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False,
                                         **sizes["vision"]),
        text_config=Qwen2Config(**{**sizes["text"], "vocab_size": vocab_size}, max_position_embeddings=32768,
                                tie_word_embeddings=True),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration._from_config(
                config, dtype=dtype, attn_implementation="sdpa"
            )
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, preset, device, dtype, is_random=True)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with Qwen's chat tokens, built offline."""
    characters = [chr(code) for code in range(32, 127)] + ["\n"]
    word_level = Tokenizer(models.WordLevel({c: i for i, c in enumerate(characters)}, unk_token="?"))
    word_level.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    word_level.decoder = decoders.Fuse()
    word_level.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="?"
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            name,
            dtype=dtype,
            device_map="auto" if device.type == "cuda" else {"": device},
            attn_implementation="sdpa",
        )
    except Exception as error:  # the Hub, the disk and the config can each fail in many ways
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"could not load model '{name}': {cause}") from error
    return LoadedModel(model.eval(), tokenizer, name, device, dtype, is_random=False)
