"""Text datasets: .txt / .jsonl -> tokenized, concatenated, fixed-length MDS samples, and the token loader.

Documents: a .txt file is one document; a .jsonl file holds one document per line in `field`.
Every document is tokenized (Hugging Face `tokenizers` JSON, or a byte-level BPE trained on the
corpus by `train_tokenizer`), followed by EOS, and the documents are concatenated. The stream is
cut into samples of seq_len + 1 tokens that overlap by one token (sample i = stream[i*L : i*L+L+1]),
so input_ids = sample[:-1] and labels = sample[1:] predict every token exactly once. Tokens are
stored as uint16 when the vocabulary fits in 16 bits, else int32 (column "tokens").

One input file is one part (see shards.py): a re-run skips finished files, and the tail of each
file that does not fill a sample (< seq_len tokens) is dropped and counted.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from pnet_dist.data.shards import (SHARD_SIZE_LIMIT, ConversionSummary, PartResult, ShardLoader, count_progress,
                                   dataset_info, streaming_kwargs, write_parts)
from pnet_dist.log import get_logger

log = get_logger(__name__)

TOKENIZER = "tokenizer.json"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
_ENCODE_BATCH = 256


def iter_documents(path: str, field: str = "text") -> Iterator[str]:
    """The documents of one .txt (the whole file) or .jsonl (one per line, in `field`) file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        yield check_text(path, Path(path).read_bytes())
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not a JSON line ({exc})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise ValueError(f"{path}:{line_no}: no string field {field!r}; pass --field with the "
                                     f"name of the text field (keys here: {sorted(record)[:8] if isinstance(record, dict) else type(record).__name__})")
                yield record[field]
    else:
        raise ValueError(f"{path}: unsupported input type {suffix!r}; give .txt or .jsonl files")


# Above this share of control characters (other than tab, newline, carriage return, form feed) a
# .txt file is binary data, not text: real text has next to none, random bytes ~12%.
MAX_CONTROL_CHAR_FRACTION = 0.001


def check_text(path: str, data: bytes) -> str:
    """The UTF-8 text of a .txt input; a ValueError naming the file for anything that is not text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); convert "
                         "it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out") from None
    num_control = sum(1 for char in text if ord(char) < 32 and char not in "\t\n\r\f" or char == "\x7f")
    if text and num_control / len(text) > MAX_CONTROL_CHAR_FRACTION:
        raise ValueError(f"{path}: {num_control} of its {len(text)} characters are control characters: this is "
                         "binary data, not text; leave it out")
    return text


def list_inputs(inputs: list[str]) -> list[str]:
    """Files named, and the .txt / .jsonl files under folders named, sorted."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in (".txt", ".jsonl"))
        elif path.is_file():
            files.append(str(path))
        else:
            raise ValueError(f"input {item} does not exist")
    if not files:
        raise ValueError(f"no .txt or .jsonl files in {inputs}")
    return files


def train_tokenizer(files: list[str], out_path: str, *, vocab_size: int, field: str = "text",
                    eos_token: str = "<|endoftext|>"):
    """Train a byte-level BPE tokenizer on the documents of files; save it as a tokenizers JSON file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((doc for path in files for doc in iter_documents(path, field)), trainer)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_path)
    return tokenizer


def find_eos(tokenizer, eos_token: str | None) -> int:
    candidates = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"the tokenizer has none of the EOS tokens {candidates}; pass --eos-token with the token "
                     f"that ends a document in this vocabulary")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def _write_text_part(files: list[str], tokenizer_json: str, field: str, eos_id: int, seq_len: int, dtype: str,
                     index: int, part_uri: str) -> PartResult:
    from streaming import MDSWriter
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    sample_len = seq_len + 1
    pending = np.zeros(0, dtype=dtype)
    num_samples = num_tokens = num_docs = 0
    columns = {"tokens": f"ndarray:{dtype}:{sample_len}"}
    with MDSWriter(out=part_uri, columns=columns, size_limit=SHARD_SIZE_LIMIT, exist_ok=True) as writer:
        def encode(docs: list[str]) -> None:
            nonlocal pending, num_samples, num_tokens, num_docs
            pieces = [pending]
            for encoding in tokenizer.encode_batch(docs, add_special_tokens=False):
                pieces += [np.asarray(encoding.ids, dtype=dtype), np.array([eos_id], dtype=dtype)]
            stream = np.concatenate(pieces)
            num_docs += len(docs)
            count_progress(len(docs))
            num_full = (len(stream) - 1) // seq_len if len(stream) > seq_len else 0
            for i in range(num_full):
                writer.write({"tokens": stream[i * seq_len:i * seq_len + sample_len]})
            num_samples += num_full
            num_tokens += num_full * seq_len
            pending = stream[num_full * seq_len:]

        batch: list[str] = []
        for doc in iter_documents(files[index], field):
            batch.append(doc)
            if len(batch) == _ENCODE_BATCH:
                encode(batch)
                batch = []
        if batch:
            encode(batch)
    # pending still holds the last sample's final token (the one-token overlap) once a sample exists.
    num_dropped = len(pending) - (1 if num_samples else 0)
    return PartResult(index, num_samples, [],
                      {"num_tokens": num_tokens, "num_documents": num_docs, "num_tokens_dropped": num_dropped})


def convert_text(inputs: list[str], out_uri: str, *, seq_len: int, tokenizer_path: str | None = None,
                 vocab_size: int | None = None, field: str = "text", eos_token: str | None = None,
                 num_workers: int = 1) -> ConversionSummary:
    """Text files -> MDS token samples + tokenizer.json beside them. Exactly one of tokenizer_path, vocab_size."""
    from tokenizers import Tokenizer

    if (tokenizer_path is None) == (vocab_size is None):
        raise ValueError("give either a tokenizer JSON file (--tokenizer) or a vocabulary size to train one "
                         "on the corpus (--train-vocab-size), not both")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    files = list_inputs(inputs)
    if tokenizer_path is None:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            trained = os.path.join(tmp, TOKENIZER)
            train_tokenizer(files, trained, vocab_size=vocab_size, field=field, eos_token=eos_token or EOS_CANDIDATES[0])
            tokenizer_json = Path(trained).read_text()
    else:
        tokenizer_json = Path(tokenizer_path).read_text()
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eos_id = find_eos(tokenizer, eos_token)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    if num_workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one process per file already
    meta = {"kind": "text", "vocab_size": vocab, "eos_id": eos_id, "seq_len": seq_len, "dtype": dtype,
            "tokenizer": TOKENIZER, "num_files": len(files)}
    write = functools.partial(_write_text_part, files, tokenizer_json, field, eos_id, seq_len, dtype)
    options = {"files": files, "seq_len": seq_len, "field": field, "eos_id": eos_id,
               "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest()}
    return write_parts(out_uri, len(files), write, num_workers=num_workers, desc="documents", meta=meta,
                       options=options, side_files={TOKENIZER: tokenizer_json.encode()})


# -- reading -------------------------------------------------------------------------------------------
def _collate_tokens(samples):
    import torch
    return torch.stack(samples)


def _finalize_tokens(tokens_BT1):
    return tokens_BT1[:, :-1].contiguous(), tokens_BT1[:, 1:].contiguous()


def build_text_loader(uri: str, *, batch_size: int, seq_len: int, num_workers: int = 1, seed: int = 42,
                      shuffle: bool = True, num_canonical_nodes: int | None = None,
                      cache_dir: str | None = None) -> ShardLoader:
    """Loader over token shards yielding (input_ids_BT int64, labels_BT int64), labels already shifted."""
    from pnet_dist.data.datasets import TokenShardDataset

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = dataset_info(uri)
    if info.get("kind") != "text":
        raise ValueError(f"{uri} holds a {info.get('kind')!r} dataset, not text")
    if seq_len != info["seq_len"]:
        raise ValueError(f"{uri} was written with seq_len {info['seq_len']}, the loader asks for {seq_len}: set "
                         f"data.seq_len to {info['seq_len']} or re-run tools/make_text_shards.py --seq-len {seq_len}")
    dataset = TokenShardDataset(**streaming_kwargs(uri, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                                   num_canonical_nodes=num_canonical_nodes, cache_dir=cache_dir))
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                       collate_fn=_collate_tokens, finalize=_finalize_tokens)
