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

    from ..errors import CheckpointError

    path = Path(path)
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # missing or corrupt files surface as many exception types
        raise CheckpointError(f"{path}: the tokenizer cannot be read ({type(e).__name__}: {e})") from None
    tok.padding_side = "left"
    if tok.pad_token is None:  # Lynx adds [PAD] to LLaMA's tokenizer
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of Lynx's prompt: BOS + template(question), lower-cased. Either tokenizer."""
    ids = tokenizer.encode(format_prompt(question), add_special_tokens=False)
    return [tokenizer.bos_token_id, *ids]


class RuntimeTokenizer:
    """A saved tokenizer directory through the `tokenizers` library alone: what the runtime needs
    (encode, decode, the special ids), without importing transformers. Encodes and decodes as
    transformers' fast tokenizer over the same `tokenizer.json` does."""

    def __init__(self, tok, bos: str, eos: str, pad: str, clean_up_spaces: bool):
        self._tok = tok
        if tok.token_to_id(pad) is None:  # Lynx adds [PAD] to LLaMA's tokenizer
            from tokenizers import AddedToken

            tok.add_special_tokens([AddedToken(pad, special=True, normalized=False)])
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (tok.token_to_id(t) for t in (bos, eos, pad))
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def load(cls, path: str | Path) -> "RuntimeTokenizer":
        import json

        from tokenizers import Tokenizer

        from ..errors import CheckpointError

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer.json (save the tokenizer with a fast tokenizer)")
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            cfg = {}
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                if (path / name).is_file():
                    cfg.update(json.loads((path / name).read_text()))
        except Exception as e:  # the tokenizers library raises plain Exceptions on malformed JSON
            raise CheckpointError(f"{path}: the tokenizer cannot be read ({type(e).__name__}: {e})") from None

        def special(key: str, default: str) -> str:
            v = cfg.get(key) or default
            return v["content"] if isinstance(v, dict) else str(v)

        bos, eos = special("bos_token", "<s>"), special("eos_token", "</s>")
        for t in (bos, eos):
            if tok.token_to_id(t) is None:
                raise CheckpointError(f"{path}: special token {t!r} is not in the tokenizer's vocabulary")
        return cls(tok, bos, eos, special("pad_token", "[PAD]"), bool(cfg.get("clean_up_tokenization_spaces", False)))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (for tokenizers saved with it on)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
