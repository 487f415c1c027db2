"""Text helpers: an in-memory character-level CLIP tokenizer for models built from config."""

from __future__ import annotations


def build_char_tokenizer(max_length: int = 77):
    """A CLIPTokenizer over the 256 byte-level characters (+ `</w>` forms), built offline."""
    from transformers import CLIPTokenizer

    chars = _byte_level_chars()
    vocab_list = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _byte_level_chars() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the 256 base symbols)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = [256 + i for i in range(256 - len(printable))]
    others = [b for b in range(256) if b not in printable]
    mapping = dict(zip(printable + others, printable + extra, strict=True))
    return [chr(mapping[b]) for b in range(256)]
