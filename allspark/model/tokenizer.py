"""The text tokenizer: a byte-level BPE trained with `tokenizers`, loaded through transformers.

Real checkpoints ship LLaMA's sentencepiece tokenizer; the presets we build ourselves (`tiny`,
`demo`) train a small byte-level BPE on the prompts and whatever text the caller adds, so nothing
is downloaded. Byte-level means every string encodes (no unknown characters). Lynx's template
"User: {question}\\nBot:" and lower-casing are applied by `format_prompt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # transformers loads on first use: the pipeline imports this module
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[PAD]")
PROMPT_TEMPLATE = "User: {question}\nBot:"


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question).lower()


def _builtin_corpus() -> list[str]:
    """Every registered modality's prompts and label names, and a few common words."""
    from .registry import specs

    lines = [format_prompt(p) for s in specs().values() for p in s.prompts]
    lines += [" ".join(labels).lower() for s in specs().values() for labels in s.label_sets.values()]
    lines += ["positive negative the a this movie review was great terrible acting plot",
              "def return self class function value list if else for in while import",
              "returns the sum of two numbers. computes the maximum of a list."]
    return lines


def train_tokenizer(vocab_size: int, texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens (specials included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([*_builtin_corpus(), *texts], trainer=trainer)
    return wrap(tok)


def wrap(tok) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="[PAD]", padding_side="left")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (tokenizer.json, optionally with tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:  # Lynx adds [PAD] to LLaMA's tokenizer
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def encode_prompt(tokenizer: PreTrainedTokenizerFast, question: str) -> list[int]:
    """Token ids of Lynx's prompt: BOS + template(question), lower-cased."""
    ids = tokenizer(format_prompt(question), add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids]
