"""Tokenizers behind one interface: vocab_size, eod, encode(text) -> ids, decode(ids) -> text.

- `HFTokenizer`: a Hugging Face `tokenizers` file (tokenizer.json), e.g. from mohge-train-tokenizer.
- `SentencePieceTokenizer`: a sentencepiece `.model` (needs the optional `sentencepiece` package).
- `ByteTokenizer`: UTF-8 bytes (256 ids) plus one end-of-document id: needs no file at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

from mohge.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eod: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(path)
        except Exception as err:  # the library raises a bare Exception on a bad file
            raise DataError(f"{path}: not a readable tokenizer.json ({err})") from err
        self.path = path
        self.vocab_size = self._tok.get_vocab_size()
        eod = self._tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise DataError(f"{path}: has no {EOD_TOKEN} token; retrain it with mohge-train-tokenizer")
        self.eod = eod

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer:
    def __init__(self, path: str):
        try:
            import sentencepiece as spm
        except ImportError as err:
            raise DataError(f"{path}: sentencepiece models need `pip install 'mohge[sentencepiece]'`") from err
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.path = path
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the end-of-document id is 256."""

    vocab_size = 257
    eod = 256
    path = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(path: Optional[str]) -> Tokenizer:
    """'bytes' (or None) -> ByteTokenizer; *.model -> sentencepiece; a tokenizer.json or a
    directory holding one -> Hugging Face tokenizers."""
    if path in (None, "", "bytes"):
        return ByteTokenizer()
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"data.tokenizer={path}: no such file; give a tokenizer.json, a directory with one, "
                        "a sentencepiece .model, or 'bytes'")
    if p.suffix == ".model":
        return SentencePieceTokenizer(str(p))
    return HFTokenizer(str(p))
