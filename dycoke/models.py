"""Loading a model of any supported family: real weights from the Hub or a local directory, or random-init presets
with the real classes and geometry (`tiny-random`, `mini`, `ov-0.5b`, `ov-7b`, `qwen2.5-vl-tiny`, ...)."""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)

from dycoke import OFFLINE_DEFAULT
from dycoke.families import Family, family_of
from dycoke.pruning import install_dp_hooks

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
# What a user must be told about the answers of the embedded trained model and of the random presets.
TINY_NOTICE = ("a tiny model trained on synthetic clips of shapes; it knows colours, shapes, motion and counts, "
               "nothing else")
RANDOM_NOTICE = "random weights: its answers are meaningless (token counts and timings are real)"
TINY_SEED = 0
IMAGE_SIZE = 384
PATCH_SIZE = 14
# Named checkpoints that ship with the project, loaded with from_pretrained like any other local directory.
ASSETS_MODELS = Path(__file__).resolve().parents[1] / "assets" / "models"
LOCAL_CHECKPOINTS = {"tiny": ASSETS_MODELS / "tiny"}
HUB_PROBE_TIMEOUT_S = 3.0
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

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
QWEN_VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|image_pad|>", "<|video_pad|>"]

# Language and vision sizes of each random-init preset; the "tiny" and `mini` ones are CPU-sized, the others have
# the real models' sizes. A wide initialisation (0.3) keeps the small random models from collapsing onto one
# repeated token, so that their output depends on the video, which the equivalence and pruning tests need.
PRESETS: dict[str, dict] = {
    "tiny-random": {
        "family": "llava-onevision",
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, initializer_range=0.3),
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    },
    "mini": {
        "family": "llava-onevision",
        "text": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2, initializer_range=0.3),
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
    },
    "ov-0.5b": {
        "family": "llava-onevision",
        "text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=152000),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
    },
    "ov-7b": {
        "family": "llava-onevision",
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152128),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
    },
    "qwen2.5-vl-tiny": {
        "family": "qwen2.5-vl",
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}),
        "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1],
                       tokens_per_second=2, initializer_range=0.3),
    },
    "qwen2.5-vl-7b": {  # Qwen/Qwen2.5-VL-7B-Instruct
        "family": "qwen2.5-vl",
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    },
    "qwen3-vl-tiny": {
        "family": "qwen3-vl",
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, initializer_range=0.3, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                      "mrope_interleaved": True}),
        "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, deepstack_visual_indexes=[0, 1],
                       initializer_range=0.3),
    },
    "qwen3-vl-8b": {  # Qwen/Qwen3-VL-8B-Instruct
        "family": "qwen3-vl",
        "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True}),
        "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                       deepstack_visual_indexes=[8, 16, 24]),
    },
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the model and the cause."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    is_random: bool

    @property
    def family(self) -> Family:
        return family_of(self.model)

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def image_size(self) -> int:
        """Side of a square frame as the model sees it."""
        if self.family.name == "llava-onevision":
            return self.model.config.vision_config.image_size
        from dycoke.families.qwen_vl import MAX_PIXELS

        return self.family.frame_size(self.model, int(MAX_PIXELS**0.5), int(MAX_PIXELS**0.5))[0]

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame (per temporal group on Qwen-VL) for a square clip; `family.geometry` for others."""
        side = self.image_size
        return self.family.geometry(self.model, 1, side, side).tokens_per_group

    @property
    def frames_per_group(self) -> int:
        """Video frames merged into one temporal group: Qwen-VL's temporal patch, 1 on LLaVA-OneVision."""
        return self.family.geometry(self.model, 1, self.image_size, self.image_size).frames_per_group

    @property
    def notice(self) -> str | None:
        """What a user must know about this model's answers, or None for real pretrained weights."""
        if self.name == "tiny":
            return TINY_NOTICE
        return RANDOM_NOTICE if self.is_random else None

    def describe(self) -> str:
        weights = self.notice or "pretrained weights"
        return (f"{self.name} [{self.family.describe(self.model)}] on {self.device.type} "
                f"({str(self.dtype).removeprefix('torch.')}, {weights})")


def load(name: str = OFFLINE_DEFAULT, device: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """`tiny` (the embedded trained model), a preset name (`tiny-random`, `mini`, `ov-0.5b`, `ov-7b`: random
    weights), a Hub id or a local path."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"cannot load '{name}' on cuda: no CUDA device is available; use --device cpu")
    dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
    if name in PRESETS:
        loaded = build_random(name, target, dtype)
    else:
        loaded = load_pretrained(name, target, dtype)
    install_dp_hooks(loaded.model)
    return loaded


def build_random(preset: str, device: torch.device, dtype: torch.dtype, seed: int = TINY_SEED) -> LoadedModel:
    """A random-init model with the real classes and geometry, deterministic for a given seed."""
    sizes = PRESETS[preset]
    specials = SPECIAL_TOKENS if sizes["family"] == "llava-onevision" else QWEN_VL_SPECIAL_TOKENS
    tokenizer = build_tokenizer(specials)
    model_class, config = RANDOM_CONFIGS[sizes["family"]](sizes, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, preset, device, dtype, is_random=True)


def llava_onevision_config(sizes: dict, tokenizer) -> tuple[type, LlavaOnevisionConfig]:
    """The model class and a LLaVA-OneVision config with the real geometry and the given text and vision sizes."""
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
    return LlavaOnevisionForConditionalGeneration, config


def _qwen_vl_config(config_class: type, model_class: type):
    def make(sizes: dict, tokenizer) -> tuple[type, object]:
        text = {**sizes["text"], "vocab_size": sizes["text"].get("vocab_size", len(tokenizer))}
        if "vocab_size" not in sizes["text"]:  # the local tokenizer's ids, not the real vocabulary's
            text |= {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id}
        small = "initializer_range" in text
        config = config_class(
            text_config=text,
            vision_config={**sizes["vision"], "out_hidden_size": text["hidden_size"]},
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=small,  # the CPU-sized models tie, like LLaVA-OV's tiny; the real sizes do not
            **({"initializer_range": text["initializer_range"]} if small else {}),
        )
        return model_class, config

    return make


RANDOM_CONFIGS = {
    "llava-onevision": llava_onevision_config,
    "qwen2.5-vl": _qwen_vl_config(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3-vl": _qwen_vl_config(Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def build_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with the family's chat and vision tokens, built offline."""
    characters = [chr(code) for code in range(32, 127)] + ["\n"]
    word_level = Tokenizer(models.WordLevel({c: i for i, c in enumerate(characters)}, unk_token="?"))
    word_level.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    word_level.decoder = decoders.Fuse()
    word_level.add_special_tokens(special_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="?"
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def resolve_source(name: str) -> tuple[str, bool]:
    """(what from_pretrained is given, whether it is on this machine); a one-line error for what cannot be loaded."""
    if name in LOCAL_CHECKPOINTS:
        path = LOCAL_CHECKPOINTS[name]
        if not path.is_dir():
            raise ModelLoadError(f"the '{name}' checkpoint is not at {path}: it has not been added to this copy")
        return str(path), True
    looks_like_path = name.startswith(("/", "./", "../", "~")) or os.sep in name.strip("/") and not HUB_ID.match(name)
    path = Path(name).expanduser()
    if path.exists() or looks_like_path:
        if not path.is_dir():
            raise ModelLoadError(f"model directory {path} does not exist (or is not a directory)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json: it is not a saved checkpoint")
        return str(path), True
    if not HUB_ID.match(name):
        raise ModelLoadError(f"'{name}' is neither a preset ({', '.join(PRESETS)}), a local directory nor a "
                             "Hugging Face Hub id (owner/name)")
    return name, False


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the Hub does not answer within a few seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    reached = threading.Event()

    def probe() -> None:
        import socket
        from urllib.parse import urlparse

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            with socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S):
                reached.set()
        except OSError:
            pass

    # DNS lookups ignore socket timeouts, so the probe runs in a thread that is simply not waited for.
    threading.Thread(target=probe, daemon=True, name="dycoke-hub-probe").start()
    return not reached.wait(HUB_PROBE_TIMEOUT_S)


def load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Any supported family's checkpoint, never with remote code; refused if it misses or mismatches weights."""
    source, local = resolve_source(name)
    offline = not local and hub_offline()
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local or offline)
        family = family_of(config)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local or offline)
        model, info = family.model_class.from_pretrained(
            source,
            config=config,
            dtype=dtype,
            device_map="auto" if device.type == "cuda" else {"": device},
            attn_implementation="sdpa",
            local_files_only=local or offline,
            output_loading_info=True,
        )
    except Exception as error:  # the Hub, the disk and the config can each fail in many ways
        if offline:
            raise ModelLoadError(f"could not load model '{name}': the Hugging Face Hub cannot be reached "
                                 "(offline, or HF_HUB_OFFLINE is set) and it is not in the local cache") from error
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"could not load model '{name}': {cause}") from error
    check_loading_info(name, info)
    return LoadedModel(model.eval(), tokenizer, name, device, dtype, is_random=False)


def check_loading_info(name: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not all load: a missing tensor would run with random values."""
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            what = "misses" if kind == "missing_keys" else "has wrongly shaped"
            raise ModelLoadError(f"checkpoint '{name}' {what} {len(keys)} weight(s): {shown}; "
                                 "it would run with random values there: use a complete checkpoint")
    if info.get("unexpected_keys"):
        log.warning("checkpoint %s has %d weights the model does not use", name, len(info["unexpected_keys"]))
