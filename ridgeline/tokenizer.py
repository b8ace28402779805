"""Tokenizer loading (with a converted-artifact cache for GGUF files) and streaming detokenization."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers.decoders import DecodeStream

log = logging.getLogger("ridgeline")

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4
# tokenizer_config.json name -> key in transformers' GGUF tokenizer dict (tokenizer.ggml.*_token_id)
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unk_token_id", "pad_token": "pad_token_id"}


def cache_dir() -> Path:
    """Where converted artifacts live: $RIDGELINE_CACHE_DIR, else $XDG_CACHE_HOME/ridgeline."""
    root = os.environ.get("RIDGELINE_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ridgeline"


def tokenizer_digest(path: Path, metadata: dict | None = None) -> str:
    """SHA-256 of what the conversion reads: a GGUF's tokenizer.* metadata and architecture. Files
    of one model in several quantizations share one converted tokenizer, and a multi-GB file is
    never hashed whole. `metadata`: the file's, when the caller has parsed it already."""
    meta = metadata
    if meta is None:
        from .gguf_file import GGUFFile

        gf = GGUFFile(path)
        try:
            meta = gf.metadata
        finally:
            gf.close()
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k.startswith("tokenizer.") or k == "general.architecture"):
        value = meta[key]
        if isinstance(value, list):
            blob = "\x00".join(map(str, value)).encode()
        elif hasattr(value, "tobytes"):
            blob = value.dtype.str.encode() + value.tobytes()
        else:
            blob = repr(value).encode()
        h.update(key.encode() + b"\x01" + blob + b"\x02")
    return h.hexdigest()


def load_tokenizer(model_path: Path, gguf_metadata: dict | None = None):
    """A transformers fast tokenizer for a checkpoint directory or GGUF file.

    Converting a GGUF vocabulary takes seconds, so the converted tokenizer is saved
    under the cache directory keyed by its tokenizer metadata (tokenizer_digest) and loaded from there next time.
    The conversion keeps every id inside the file's vocabulary and the file's BOS / EOS /
    padding / unknown ids (see `_repair_gguf_conversion`).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model_path.is_dir():
        if not ((model_path / "tokenizer.json").is_file() or (model_path / "tokenizer_config.json").is_file()):
            raise FileNotFoundError(f"model: {model_path} has no tokenizer.json")
        return AutoTokenizer.from_pretrained(str(model_path))
    target = cache_dir() / "tokenizers" / tokenizer_digest(model_path, gguf_metadata)
    if (target / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(target))
        if _ids_in_vocab(tok):
            return tok
        # converted before the out-of-vocabulary fix: convert again
        log.info("tokenizer: cached conversion %s has ids past the vocabulary; converting again", target)
        shutil.rmtree(target, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        tok.save_pretrained(str(tmp))
        meta = _gguf_tokenizer_dict(model_path)
        if _repair_gguf_conversion(tmp, meta, model_path):
            tok = AutoTokenizer.from_pretrained(str(tmp))
        _check_gguf_conversion(tok, meta, model_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


# ---------------------------------------------------------------- GGUF conversion repair
#
# transformers (5.x) builds a byte-level BPE vocabulary from a GGUF by respelling every token that
# has characters outside GPT-2's byte alphabet into that alphabet, and adds as special tokens only
# the control tokens that are already spelled in it. llama.cpp stores control tokens literally, so a
# control token such as DeepSeek-R1's `<｜begin▁of▁sentence｜>` (fullwidth bars, U+2581) ends up in
# the vocabulary only under its respelling. Naming it as the BOS token then appends it as a *new*
# token past the vocabulary (152065 in a 152,064-token file), as does the builder's default
# `<|endoftext|>`; every prompt with BOS then indexes past the embedding. Chat-template markers
# like `<｜User｜>` are cut into byte pieces as well.


def _gguf_tokenizer_dict(model_path: Path) -> dict:
    """The file's tokenizer metadata as transformers' converter sees it (tokens, token_type, *_token_id, ...)."""
    from transformers.integrations.gguf import get_gguf_tokenizer

    _, meta, config = get_gguf_tokenizer(str(model_path))
    meta.update({k: config[k] for k in ("add_bos_token", "add_eos_token") if k in config})
    return meta


def _byte_level_spelling(text: str) -> str:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return "".join(spelling[b] for b in text.encode("utf-8"))


def _repair_gguf_conversion(directory: Path, meta: dict, model_path: Path) -> bool:
    """Fix the saved conversion of `model_path` (tokenizer metadata `meta`) in `directory` in place;
    True when anything changed.

    - A control (or, in a byte-level vocabulary, user-defined) token, or one the file names as
      BOS / EOS / padding / unknown, is matched under its literal text at its own id: its
      respelled vocabulary entry is renamed back to the literal text and it becomes an added token.
    - Added tokens with an id at or past the file's token count are removed.
    - The special tokens in tokenizer_config.json are the file's ids' tokens (or none), and the
      post-processor's special-token ids are looked up again.
    """
    tokens: list[str] = meta["tokens"]
    types = list(meta.get("token_type") or ())
    n = len(tokens)
    byte_level = meta.get("tokenizer_type") == "gpt2"
    tj_path, tc_path = directory / "tokenizer.json", directory / "tokenizer_config.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    changed = False

    vocab = tj["model"].get("vocab")
    if isinstance(vocab, dict):  # BPE / WordPiece / WordLevel: piece -> id
        id_to_piece = {i: p for p, i in vocab.items()}

        def rename(i: int, old: str, new: str) -> None:
            del vocab[old]
            vocab[new] = i
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        id_to_piece = {i: e[0] for i, e in enumerate(vocab)}

        def rename(i: int, old: str, new: str) -> None:
            vocab[i][0] = new
    else:
        id_to_piece, rename = {}, None
    piece_to_id = {p: i for i, p in id_to_piece.items()}

    special_ids = {meta[key] for key in _SPECIAL_IDS.values() if isinstance(meta.get(key), int)}
    wanted: dict[int, bool] = {}  # id -> special
    for i, tt in enumerate(types):
        if tt == _CONTROL or (byte_level and tt == _USER_DEFINED):
            wanted[i] = tt == _CONTROL
    for i in special_ids:
        if 0 <= i < n:
            wanted[i] = True

    added = [t for t in tj.get("added_tokens", []) if t["id"] < n]
    if len(added) != len(tj.get("added_tokens", [])):
        changed = True
    added_by_id = {t["id"]: t for t in added}
    for i, special in sorted(wanted.items()):
        literal = tokens[i]
        if piece_to_id.get(literal) == i:
            if i in added_by_id and added_by_id[i]["content"] != literal:
                added_by_id[i]["content"] = literal
                changed = True
            continue
        old = id_to_piece.get(i)
        if (rename is None or old is None or not byte_level or literal in piece_to_id
                or old != _byte_level_spelling(literal)):
            continue  # not the respelling this repairs (e.g. a duplicate token): left as it is
        rename(i, old, literal)
        del piece_to_id[old]
        piece_to_id[literal] = i
        id_to_piece[i] = literal
        entry = added_by_id.get(i)
        if entry is None:
            entry = {"id": i, "content": literal, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": special}
            added.append(entry)
            added_by_id[i] = entry
        entry["content"] = literal
        changed = True
    added.sort(key=lambda t: t["id"])
    tj["added_tokens"] = added
    added_ids = {t["content"]: t["id"] for t in added}

    def resolve(content) -> int | None:
        if isinstance(content, dict):
            content = content.get("content")
        if not isinstance(content, str):
            return None
        i = added_ids.get(content, piece_to_id.get(content))
        return i if i is not None and i < n else None

    for name, key in _SPECIAL_IDS.items():
        i = meta.get(key)
        if isinstance(i, int) and 0 <= i < n and resolve(id_to_piece.get(i)) == i:
            value = id_to_piece[i]
        elif isinstance(i, int):
            log.warning("tokenizer: %s: %s %d cannot be kept (the file has %d tokens)", model_path, key, i, n)
            value = None
        else:  # the file names none: keep transformers' choice only if it is in the vocabulary
            value = tc.get(name) if resolve(tc.get(name)) is not None else None
        if _content(tc.get(name)) != _content(value):
            tc[name] = value
            changed = True
    for name in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(tc.get(name), list):
            kept = [t for t in tc[name] if resolve(t) is not None]
            if len(kept) != len(tc[name]):
                tc[name] = kept
                changed = True
    if isinstance(tc.get("added_tokens_decoder"), dict):
        kept = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < n}
        if len(kept) != len(tc["added_tokens_decoder"]):
            tc["added_tokens_decoder"] = kept
            changed = True

    def fix_post_processor(pp) -> bool:
        """Look the ids of TemplateProcessing's special tokens up again; False if one is unknown."""
        if not isinstance(pp, dict):
            return True
        if pp.get("type") == "Sequence":
            return all(fix_post_processor(p) for p in pp.get("processors", []))
        ok = True
        for entry in (pp.get("special_tokens") or {}).values():
            ids = [resolve(t) for t in entry.get("tokens", [])]
            if None in ids:
                ok = False
            elif ids != entry.get("ids"):
                entry["ids"] = ids
        return ok

    before = json.dumps(tj.get("post_processor"), sort_keys=True)
    if not fix_post_processor(tj.get("post_processor")):
        # transformers rebuilds BOS / EOS insertion from the config's add_*_token flags and tokens
        tj["post_processor"] = None
        for flag, key in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
            if flag in meta and tc.get(key) is not None:
                tc[flag] = bool(meta[flag])
    if json.dumps(tj.get("post_processor"), sort_keys=True) != before:
        changed = True

    if changed:
        tj_path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
    return changed


def _content(token):
    return token.get("content") if isinstance(token, dict) else token


def _ids_in_vocab(tok) -> bool:
    """Whether every id the tokenizer can produce (added tokens, BOS / EOS insertion) is a model vocabulary id."""
    backend = tok.backend_tokenizer
    n = max(backend.get_vocab(with_added_tokens=False).values(), default=-1) + 1
    if any(i >= n for i in tok.added_tokens_decoder):
        return False
    return all(i < n for i in tok("").input_ids)


def _check_gguf_conversion(tok, meta: dict, model_path: Path) -> None:
    """Raise if the converted tokenizer can produce an id past the vocabulary; warn if a special id moved."""
    n = len(meta["tokens"])
    bad = sorted(i for i in tok.added_tokens_decoder if i >= n)
    bad += [i for i in tok("").input_ids if i >= n]
    if bad:
        raise ValueError(f"tokenizer: converting {model_path} gave token ids {bad[:5]} past its {n}-token vocabulary")
    for name, key in _SPECIAL_IDS.items():
        want = meta.get(key)
        if isinstance(want, int) and 0 <= want < n and getattr(tok, f"{name}_id") != want:
            log.warning("tokenizer: %s: %s is %s, the file says %d", model_path, f"{name}_id",
                        getattr(tok, f"{name}_id"), want)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces; never emits half a UTF-8 character.

    The stream is primed with the tail of the prompt so that the first generated
    token is decoded in context (leading spaces, merges of byte-level pieces).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for tid in prompt_ids[-4:]:
            self._stream.step(self._backend, tid)

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._backend, token_id)
        return piece or ""
