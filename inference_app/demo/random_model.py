"""Builds random-weight Phi-3-family models, a local tokenizer (Phi-3's chat template) and a LoRA adapter on disk.

The folders follow the AI Toolkit's layout on the Azure Files share (inference_app.demo.share_layout), so the app
loads them through the same code path as in Azure.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on a small built-in corpus and the weights
are random (fixed seed), so every build is identical. Used by `python -m inference_app --demo` (size "small"),
the tests ("tiny") and the bench scripts ("small": Phi-3's shape scaled for a 2-core CPU; "mini": the real
Phi-3-mini shape, for a GPU).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from inference_app.demo.share_layout import BASE_MODEL_NAME, ModelFolders, adapter_folder, model_folder

# The AI Toolkit's LoRA settings for Phi-3 (rank 64 on the fused attention projections).
LORA_TARGET_MODULES = ("qkv_proj", "o_proj")

# Phi-3's special tokens; generation stops on any of the last three (as Phi-3's generation_config does).
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
STOP_TOKENS = (END_OF_TEXT, "<|assistant|>", "<|end|>")

# Phi-3-mini-4k-instruct's chat template.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

_TRAINED_VOCAB_SIZE = 600  # an upper bound: the corpus yields about 500 tokens
# Small English corpus the byte-level BPE learns its merges from; any text still encodes (byte fallback).
_CORPUS = """
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
Azure Container Apps run containers on serverless GPUs. The model answers questions about the weather.
Fine-tuning a small language model with LoRA adapters keeps the base weights frozen.
What is the capital of France? Paris is the capital of France. Tell me a story about a cat.
Write a haiku about the sea. Explain how a transformer works in one sentence.
Stop here. The end. Question: Answer: one two three four five six seven eight nine ten.
""".strip().splitlines()


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    context_length: int
    lora_rank: int
    # None: what the tokenizer learns from the corpus (about 500). Phi-3's is 32064.
    vocab_size: int | None = None
    # Wider than transformers' 0.02, so that random weights give peaked logits and greedy replies that vary
    # with the prompt instead of repeating one token.
    initializer_range: float = 0.2
    sliding_window: int | None = None  # Phi-3-mini-4k attends to the last 2047 positions


SIZES: dict[str, ModelSize] = {
    # Fast enough that the whole test suite can load and generate many times.
    "tiny": ModelSize(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        context_length=512,
        lora_rank=8,
    ),
    # Phi-3's proportions (head dim 96, MLP 8/3 of hidden, Phi-3's vocabulary), scaled to a 2-core CPU.
    "small": ModelSize(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=1024,
        context_length=4096,
        lora_rank=64,
        vocab_size=32064,
    ),
    # The real Phi-3-mini-4k-instruct shape (3.8B parameters): build it in bfloat16, for a GPU.
    "mini": ModelSize(
        hidden_size=3072,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=8192,
        context_length=4096,
        lora_rank=64,
        vocab_size=32064,
        sliding_window=2047,
    ),
}


def build_tokenizer(path: Path, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on the built-in corpus and saves it with Phi-3's chat template.

    With `vocab_size` the vocabulary is padded to that size with word tokens (" w123") that encoding never
    produces but decoding turns into text, so a random model of Phi-3's vocabulary size streams visible text.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_TRAINED_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    if vocab_size is not None:
        tokenizer = _pad_vocabulary(tokenizer, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        chat_template=PHI3_CHAT_TEMPLATE,
        model_max_length=None,
    )
    fast.save_pretrained(path)
    return fast


def _pad_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    while len(vocab) < vocab_size:
        vocab[f"\u0120w{len(vocab)}"] = len(vocab)  # "\u0120" is byte-level BPE's space
    return Tokenizer.from_str(json.dumps(state))


def phi3_config(size: ModelSize, tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype) -> Phi3Config:
    eos_id = _token_id(tokenizer, END_OF_TEXT)
    return Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        max_position_embeddings=size.context_length,
        original_max_position_embeddings=size.context_length,
        sliding_window=size.sliding_window,
        initializer_range=size.initializer_range,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype=dtype,
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)  # one token in, one id out
    return token_id


def _model_size(size: str | ModelSize) -> ModelSize:
    return SIZES[size] if isinstance(size, str) else size


def build_base_model(
    path: Path, size: str | ModelSize = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> None:
    """Saves tokenizer, config, generation config and random weights of a Phi-3-family model in `path`."""
    model_size = _model_size(size)
    tokenizer = build_tokenizer(path, model_size.vocab_size)
    config = phi3_config(model_size, tokenizer, dtype)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM._from_config(config, dtype=dtype)
    model.generation_config = generation_config(tokenizer, config)
    model.save_pretrained(path)


def generation_config(tokenizer: PreTrainedTokenizerFast, config: Phi3Config) -> GenerationConfig:
    """Phi-3's: generation stops on any of STOP_TOKENS."""
    return GenerationConfig(
        eos_token_id=[_token_id(tokenizer, token) for token in STOP_TOKENS],
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
    )


def build_adapter(
    base_model_path: Path,
    adapter_path: Path,
    size: str | ModelSize = "tiny",
    seed: int = 1,
    base_model_name: str = f"microsoft/{BASE_MODEL_NAME}",
    dtype: torch.dtype = torch.float32,
) -> None:
    """Saves a LoRA adapter for the model in `base_model_path`, with random non-zero A and B weights.

    `base_model_name` goes into adapter_config.json as the toolkit writes it (the hub name, not the path).
    """
    base = Phi3ForCausalLM.from_pretrained(base_model_path, dtype=dtype)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, lora_config(size))
    peft_model.save_pretrained(str(adapter_path))
    _set_base_model_name(adapter_path, base_model_name)


def lora_config(size: str | ModelSize) -> LoraConfig:
    """The toolkit's LoRA settings for Phi-3 at the size's rank, with random non-zero A and B weights."""
    rank = _model_size(size).lora_rank
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGET_MODULES),
        task_type="CAUSAL_LM",
        # Random B (peft's default is B = 0, which would leave outputs unchanged).
        init_lora_weights=False,
    )


def _set_base_model_name(adapter_path: Path, base_model_name: str) -> None:
    config_file = adapter_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_model_name
    config_file.write_text(json.dumps(config, indent=2))


def build_model_folders(
    root: Path,
    size: str | ModelSize = "tiny",
    seed: int = 0,
    name: str = BASE_MODEL_NAME,
    dtype: torch.dtype = torch.float32,
) -> ModelFolders:
    """Builds base model, tokenizer and adapter under `root` in the AI Toolkit's share layout."""
    model_path = model_folder(root, name)
    adapter_path = adapter_folder(root)
    build_base_model(model_path, size=size, seed=seed, dtype=dtype)
    build_adapter(model_path, adapter_path, size=size, seed=seed + 1, base_model_name=f"microsoft/{name}", dtype=dtype)
    return ModelFolders(root=root, model_path=model_path, adapter_path=adapter_path)


# Written last into a cached build: a build cut short has no mark and is built again.
BUILT_MARK = "random-model-built"


def cached_model_folders(root: Path, size: str, dtype: torch.dtype = torch.float32) -> tuple[ModelFolders, bool]:
    """The model of `size` in `root`, built unless an earlier build completed there; and whether it was built now.

    Built beside `root` and renamed into it, so an interrupted build never looks complete; only `root` and that
    build folder are ever replaced."""
    folders = ModelFolders.under(root)
    if (root / BUILT_MARK).is_file():
        return folders, False
    building = root.with_name(f"{root.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    build_model_folders(building, size=size, dtype=dtype)
    (building / BUILT_MARK).write_text(f"random-weight {size} model built by inference_app.demo.random_model\n")
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    return folders, True
