"""Tokenizers trained in the test with the `tokenizers` package (nothing downloaded):
byte-level BPE as Qwen2 and GPT-2 use it, framed as Qwen2.5 (no BOS) or Llama (BOS
added by the post-processor)."""

import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
BOS = "<s>"
SPECIAL = [EOS, BOS, "<|im_end|>"]  # ids 0, 1, 2


def write_bpe_tokenizer(
    directory, texts, *, vocab_size=320, bos=False, config=None, generation=None
) -> pathlib.Path:
    """Train a byte-level BPE tokenizer on `texts` and write `tokenizer.json` and
    `tokenizer_config.json` (Qwen2.5's framing: no BOS, EOS `<|endoftext|>`) into
    `directory`; `bos` adds `<s>` before every text as Llama's post-processor does;
    `config` replaces the tokenizer config, `generation` writes a
    `generation_config.json`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
        )
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is None:
        config = {"bos_token": BOS if bos else None, "eos_token": EOS}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory
