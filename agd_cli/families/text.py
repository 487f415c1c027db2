"""Text helpers: in-memory character-level tokenizers (CLIP, T5, Gemma) for models built from config."""

from __future__ import annotations

from transformers import CLIPTokenizer, GemmaTokenizer, T5Tokenizer


def build_char_tokenizer(max_length: int = 77):
    """A CLIPTokenizer over the 256 byte-level characters (+ `</w>` forms), built offline."""
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


def _printable_chars() -> list[str]:
    """ASCII letters, digits and punctuation, plus SentencePiece's word-start mark."""
    return [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["\u2581"]


def build_t5_tokenizer(max_length: int = 256):
    """A T5Tokenizer (Unigram) over single characters, built offline; pad 0, eos 1, unk 2."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in _printable_chars()]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_gemma_tokenizer(max_length: int = 300):
    """A GemmaTokenizer (BPE without merges) over single characters, built offline."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + _printable_chars())}
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, add_eos_token=False,
                          model_max_length=max_length)
