"""Gemma 3 tokenizer: SentencePiece (BPE, byte fallback) plus control-token splitting.

``Tokenizer`` wraps a serialized SentencePiece ``ModelProto`` -- either the official
``tokenizer.model`` or one rebuilt from GGUF metadata by :func:`proto_from_gguf_metadata`:

* GGUF stores tokens, scores (for Gemma's BPE model: merge ranks as negative floats) and token
  types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte -- the same numbers
  as SentencePiece's ``ModelProto.SentencePiece.Type``).
* llama.cpp spells spaces in user-defined whitespace-only pieces as ' '; SentencePiece wants '▁'.
* The model is BPE with the identity normalizer, no dummy prefix, extra whitespace kept and byte
  fallback on (this reproduces the Hugging Face Gemma 3 tokenizer; tests/test_tokenizer.py).

SentencePiece never produces control tokens from text, so :meth:`Tokenizer.encode` first splits
the text on control-token strings (``<start_of_turn>``, ``<end_of_turn>``, ``<bos>`` ...) and
maps those to their ids, like the Hugging Face tokenizer's special tokens.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def proto_from_gguf_metadata(meta: Mapping[str, Any]) -> bytes:
  """A serialized SentencePiece BPE ``ModelProto`` from GGUF ``tokenizer.ggml.*`` fields."""
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # pylint: disable=import-outside-toplevel
  tokens, scores, types = meta["tokens"], meta["scores"], meta["token_type"]
  if not len(tokens) == len(scores) == len(types):
    raise ValueError(f"GGUF tokenizer: {len(tokens)} tokens, {len(scores)} scores, "
                     f"{len(types)} token types (must be equal)")
  if meta.get("model", "llama") not in ("llama",):
    raise ValueError(f"GGUF tokenizer.ggml.model is {meta.get('model')!r}, expected 'llama' "
                     "(SentencePiece)")
  unk_id = int(meta.get("unk_id", 3))
  m = sp_pb2.ModelProto()
  for i, (piece, score, typ) in enumerate(zip(tokens, scores, types)):
    typ = int(typ)
    if i == unk_id:
      typ = _SP_UNKNOWN
    elif typ == _SP_UNKNOWN:  # only one UNKNOWN piece is allowed
      typ = _SP_CONTROL
    if typ not in (1, 2, 3, 4, 5, 6):
      raise ValueError(f"GGUF tokenizer: token {i} {piece!r} has unknown type {typ}")
    if typ == _SP_USER and piece and piece.isspace():
      piece = piece.replace(" ", "\u2581")
    sp = m.pieces.add()
    sp.piece = piece
    sp.score = float(score)
    sp.type = typ
  ts = m.trainer_spec
  ts.model_type = sp_pb2.TrainerSpec.BPE
  ts.vocab_size = len(tokens)
  ts.byte_fallback = True
  ts.unk_id = unk_id
  ts.bos_id = int(meta.get("bos_id", 2))
  ts.eos_id = int(meta.get("eos_id", 1))
  ts.pad_id = int(meta.get("pad_id", 0))
  # SentencePieceProcessor.bos_id() etc. look the pieces up by name.
  ts.unk_piece = tokens[ts.unk_id]
  ts.bos_piece = tokens[ts.bos_id]
  ts.eos_piece = tokens[ts.eos_id]
  ts.pad_piece = tokens[ts.pad_id]
  ts.split_digits = True
  ts.allow_whitespace_only_pieces = True
  ns = m.normalizer_spec
  ns.name = "identity"
  ns.add_dummy_prefix = False
  ns.remove_extra_whitespaces = False
  ns.escape_whitespaces = True
  return m.SerializeToString()


class Tokenizer:
  """Gemma 3 tokenizer (ids: ``pad_id`` 0, ``eos_id`` 1, ``bos_id`` 2).

  Args:
    model: a serialized ``ModelProto`` (bytes) or a path to a ``tokenizer.model`` file.
  """

  def __init__(self, model: bytes | str | os.PathLike):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    if isinstance(model, (bytes, bytearray)):
      proto = bytes(model)
    else:
      if not os.path.isfile(model):
        raise FileNotFoundError(f"tokenizer model not found: {model}")
      with open(model, "rb") as f:
        proto = f.read()
    self.proto = proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
      raise ValueError(f"not a SentencePiece model ({len(proto)} bytes): {e}") from e
    self.vocab_size = int(self._sp.GetPieceSize())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.pad_id = int(self._sp.pad_id())
    self.unk_id = int(self._sp.unk_id())
    self.control_ids = {self._sp.IdToPiece(i): i for i in range(self.vocab_size)
                        if self._sp.IsControl(i)}
    # Longest first so that e.g. '<start_of_image>' wins over a shorter prefix.
    names = sorted((p for p in self.control_ids if p), key=len, reverse=True)
    self._control_re = re.compile("|".join(re.escape(p) for p in names)) if names else None

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text`` (control-token strings map to their ids)."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    ids: list[int] = [self.bos_id] if add_bos else []
    pos = 0
    if self._control_re is not None:
      for m in self._control_re.finditer(text):
        if m.start() > pos:
          ids.extend(self._sp.EncodeAsIds(text[pos:m.start()]))
        ids.append(self.control_ids[m.group(0)])
        pos = m.end()
    if pos < len(text):
      ids.extend(self._sp.EncodeAsIds(text[pos:]))
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
    """Text of ``ids``; control tokens are rendered as their strings unless ``skip_special``
    (``pad`` is always dropped)."""
    ids = [int(i) for i in np.asarray(list(ids)).reshape(-1)] if not isinstance(ids, list) \
        else [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"decode: ids out of range [0, {self.vocab_size}): {bad[:8]}")
    out: list[str] = []
    run: list[int] = []
    for i in ids:
      if self._sp.IsControl(i):
        if run:
          out.append(self._sp.DecodeIds(run))
          run = []
        if not skip_special and i != self.pad_id:
          out.append(self._sp.IdToPiece(i))
      else:
        run.append(i)
    if run:
      out.append(self._sp.DecodeIds(run))
    return "".join(out)

  def encode_batch(self, texts: Sequence[str], pad_to: Optional[int] = None,
                   add_bos: bool = True, add_eos: bool = False,
                   truncate: str = "error") -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(ids_BxL int32, mask_BxL bool)``; ``L = pad_to`` or the longest text.

    ``truncate``: what to do when a text is longer than ``pad_to``: 'error', 'left' (keep the
    end) or 'right' (keep the start).
    """
    seqs = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
    length = pad_to if pad_to is not None else max((len(s) for s in seqs), default=0)
    ids_BxL = np.full((len(seqs), length), self.pad_id, np.int32)
    mask_BxL = np.zeros((len(seqs), length), bool)
    for b, s in enumerate(seqs):
      if len(s) > length:
        if truncate == "left":
          s = s[len(s) - length:]
        elif truncate == "right":
          s = s[:length]
        else:
          raise ValueError(f"encode_batch: text {b} has {len(s)} tokens > pad_to={length}")
      ids_BxL[b, :len(s)] = s
      mask_BxL[b, :len(s)] = True
    return ids_BxL, mask_BxL

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return int(self._sp.PieceToId(piece))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the serialized ModelProto (a ``tokenizer.model`` file; local or gs://)."""
    from userllm_jax import paths  # pylint: disable=import-outside-toplevel
    paths.write_atomic(path, self.proto)
