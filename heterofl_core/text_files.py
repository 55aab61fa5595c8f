"""Word-level text corpora on disk -> token-id streams (WikiText2, SOTU, any corpus in their format).

A corpus under the data root has one of these layouts (``text_layout``): three token files
``{train,valid,test}.tokens`` (or ``wiki.*.tokens``), Hugging Face's parquet files with a
``text`` column, or, for WikiText2, the original ``wikitext-2-v1.zip`` read as it is. Words are
read as pytorch/examples word_language_model reads them; the vocabulary is the training split's.
WikiText2 can be downloaded (``fetch_wikitext2``): pinned files, checksummed.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import DataError, FetchError, TextData, staging

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")

# WikiText-2 (Merity et al., "Pointer Sentinel Mixture Models", 2016), word level, as released in
# wikitext-2-v1.zip. Its original address (s3.amazonaws.com/research.metamind.io) refuses downloads
# since 2024 (pytorch/text#2247, #2255); the same data is published today in these layouts, which
# fetch tries in this order. Hugging Face: the Salesforce/wikitext dataset, config wikitext-2-v1,
# one parquet file per split, pinned to the commit that wrote them ("Convert dataset to Parquet
# (#8)"), so the checksums below stay true whatever happens on main later.
WIKITEXT2_HF_URL = ("https://huggingface.co/datasets/Salesforce/wikitext/resolve/"
                    "b08601e04326c79dfdd32d625aee71d232d685c3/wikitext-2-v1/{}")
WIKITEXT2_PARQUET_SHA256 = {  # SHA-256 as the Hub publishes them ("Git LFS Details" of each file's page)
    # huggingface.co/datasets/Salesforce/wikitext/blob/9f7c666b6370668ee2dd874330e917f2dbe2c45f/wikitext-2-v1/
    # train-00000-of-00001.parquet (6,068,114 bytes; the same oid in the parquet-converter's commit 9f50660)
    "train-00000-of-00001.parquet": "dfc27e4360c639dc1fba1e403bfffd53af4a5c75d5363b5724d49bf12d07cce6",
    # huggingface.co/datasets/Salesforce/wikitext/blob/main/wikitext-2-v1/validation-00000-of-00001.parquet
    "validation-00000-of-00001.parquet": "717de9a0c1c0b0b1dfdd8f1e6ad8a30ece618bbde81f5da8207277547d324215",
    # huggingface.co/datasets/Salesforce/wikitext/blob/9f7c666b6370668ee2dd874330e917f2dbe2c45f/wikitext-2-v1/
    # test-00000-of-00001.parquet
    "test-00000-of-00001.parquet": "e6b3913da714b63a60a571698b20ff15441fb015783ea1b5285f707d4f2f00a9",
}
WIKITEXT2_ZIP = "wikitext-2-v1.zip"  # members wikitext-2/wiki.{train,valid,test}.tokens
WIKITEXT2_ZIP_URL = "https://wikitext.smerity.com/wikitext-2-v1.zip"  # the dataset author's own mirror
WIKITEXT2_ZIP_MD5 = "542ccefacc6c27f945fb54453812b3cd"  # the original archive's, torchtext/datasets/wikitext2.py
WIKITEXT2_SOURCES = [  # (source, [(url, file name, hash, published digest)]), in the order fetch tries them
    ("Hugging Face Salesforce/wikitext, config wikitext-2-v1 (parquet)",
     [(WIKITEXT2_HF_URL.format(file), file, "sha256", digest) for file, digest in WIKITEXT2_PARQUET_SHA256.items()]),
    (f"{WIKITEXT2_ZIP} from the author's mirror", [(WIKITEXT2_ZIP_URL, WIKITEXT2_ZIP, "md5", WIKITEXT2_ZIP_MD5)]),
]
USER_AGENT = "Mozilla/5.0 (compatible; heterofl data fetch)"  # the mirror answers 403 to urllib's default agent

PARQUET_STEMS = {"train": ("train",), "valid": ("validation", "valid"), "test": ("test",)}  # Hugging Face: "validation"
TOKENS, PARQUET, ARCHIVE = "token files", "parquet files", "original archive"  # the text layouts, as sources name them


def text_layout(folder: str, wikitext_zip: bool = False) -> list[str]:
    """The layouts a corpus may have in ``folder`` under the data root, for messages."""
    layout = [
        f"{folder}/{{train,valid,test}}.tokens or {folder}/wiki.{{train,valid,test}}.tokens   (UTF-8 text, tokens "
        "separated by whitespace; the loader adds <eos> at the end of every line), or",
        f"{folder}/{{train,validation,test}}-*.parquet   (a 'text' column, one row per line, as Hugging Face has it)",
    ]
    if wikitext_zip:
        layout[-1] += ", or"
        layout.append(f"{folder}/{WIKITEXT2_ZIP} as it is, or unpacked as wikitext-2/wiki.{{train,valid,test}}.tokens")
    return layout


def find_text(folders: list[Path], wikitext_zip: bool = False) -> tuple[str, Path, list[list[Path]]] | None:
    """The first text layout in ``folders``: (kind, folder or archive, files of train, valid, test); with
    ``wikitext_zip`` also the first folder's wikitext-2-v1.zip."""
    for folder in folders:
        for prefix in ("wiki.", ""):
            paths = [folder / f"{prefix}{split}.tokens" for split in SPLITS]
            if all(p.is_file() for p in paths):
                return TOKENS, folder, [[p] for p in paths]
    shards = [_parquet_shards(folders[0], split) for split in SPLITS]
    if all(shards):
        return PARQUET, folders[0], shards
    archive = folders[0] / WIKITEXT2_ZIP
    if wikitext_zip and archive.is_file():
        return ARCHIVE, archive, [[archive]] * len(SPLITS)
    return None


def _parquet_shards(folder: Path, split: str) -> list[Path]:
    """A split's parquet files in folder: <stem>-*.parquet (e.g. train-00000-of-00001.parquet) or <stem>.parquet."""
    for stem in PARQUET_STEMS[split]:
        shards = sorted(folder.glob(f"{stem}-*.parquet")) + sorted(folder.glob(f"{stem}.parquet"))
        if shards:
            return shards
    return []



def _words(lines: Iterable[str]) -> list[str]:
    """Words as pytorch/examples word_language_model reads a token file: line.split() + ['<eos>'] per line."""
    return [word for line in lines for word in line.split() + [EOS]]


def _split_words(name: str, kind: str, paths: list[Path], split: str) -> list[str]:
    """The words of one split in any text layout (a parquet row is one line of the token file)."""
    try:
        if kind == PARQUET:
            return _words(line for path in paths for line in _parquet_lines(path, name))
        if kind == ARCHIVE:
            return _archive_words(paths[0], split, name)
        with open(paths[0], encoding="utf-8") as f:
            return _words(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: {_split_file(kind, paths, split)} is not UTF-8 text "
                        f"(byte {e.start}: {e.reason})") from e


def _split_file(kind: str, paths: list[Path], split: str) -> str:
    """A split's file(s), for messages."""
    if kind == ARCHIVE:
        return f"{paths[0]} (member wikitext-2/wiki.{split}.tokens)"
    return ", ".join(str(p) for p in paths)


def _parquet_lines(path: Path, name: str) -> list[str]:
    """The 'text' column of a parquet file, one line per row (a missing value is an empty line)."""
    import pyarrow as pa  # only this layout needs pyarrow, which takes a while to import
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{name}: {path} is not a readable parquet file ({type(e).__name__}: {e})") from e
    kind = table.schema.field("text").type if "text" in table.column_names else None
    if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        found = ", ".join(f"{f.name} ({f.type})" for f in table.schema)
        raise DataError(f"{name}: {path} has no 'text' column of strings (its columns: {found})")
    return [line or "" for line in table.column("text").to_pylist()]


def _archive_words(archive: Path, split: str, name: str) -> list[str]:
    """The words of wikitext-2/wiki.<split>.tokens read from the zip itself (line ends as open() reads them)."""
    try:
        with zipfile.ZipFile(archive) as z, z.open(f"wikitext-2/wiki.{split}.tokens") as member:
            return _words(io.TextIOWrapper(member, encoding="utf-8"))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: {archive} is not a readable {WIKITEXT2_ZIP} ({type(e).__name__}: {e}); "
                        "delete it and run `heterofl data fetch WikiText2` again") from e


def read_corpus(name: str, kind: str, where: Path, files: list[list[Path]]) -> TextData:
    """The train, valid and test files of a text layout -> TextData with the vocabulary of the training split."""
    train_words = _split_words(name, kind, files[0], SPLITS[0])
    vocab = list(dict.fromkeys(train_words))  # order of first appearance
    index = {word: i for i, word in enumerate(vocab)}
    streams = [torch.tensor([index[w] for w in train_words], dtype=torch.int64)]
    for paths, split in zip(files[1:], SPLITS[1:]):
        words = _split_words(name, kind, paths, split)
        unknown = {w for w in words if w not in index}
        if unknown and UNK not in index:
            raise DataError(
                f"{name}: {_split_file(kind, paths, split)} has {len(unknown)} words not in the training vocabulary "
                f"(e.g. {sorted(unknown)[:5]}) and the training split has no {UNK} token to map them to"
            )
        unk = index.get(UNK)
        streams.append(torch.tensor([index.get(w, unk) for w in words], dtype=torch.int64))
    return TextData(name=name, source=f"{name} ({kind}) at {where}", vocab=vocab,
                    train=streams[0], valid=streams[1], test=streams[2])


def _download(url: str, dest: Path, algorithm: str, digest: str, progress: bool) -> None:
    """Stream url into dest with a progress bar over its bytes; DataError when its checksum is not `digest`."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    check = hashlib.new(algorithm)
    with (urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as f,
          tqdm(total=getattr(response, "length", None), unit="B", unit_scale=True, unit_divisor=1024,
               desc=dest.name, disable=not progress) as bar):
        while chunk := response.read(1 << 16):
            f.write(chunk)
            check.update(chunk)
            bar.update(len(chunk))
    if check.hexdigest() != digest:
        raise DataError(f"{dest.name} has {algorithm.upper()} {check.hexdigest()}, expected {digest}")


def fetch_wikitext2(folder: Path, progress: bool) -> None:
    """Download WikiText-2 from the first source that serves it into ``folder`` (parquet files or the zip);
    FetchError naming each source and why it failed."""
    attempts = []
    with staging(folder.parent) as stage:
        for source, files in WIKITEXT2_SOURCES:
            try:
                for url, file, algorithm, digest in files:
                    _download(url, stage / file, algorithm, digest, progress)
            except (OSError, http.client.HTTPException, DataError) as e:  # URLError and timeouts are OSErrors
                attempts.append((source, f"{url}: {e}"))
                continue
            folder.mkdir(exist_ok=True)
            for _, file, _, _ in files:
                os.replace(stage / file, folder / file)
            return
    raise FetchError(attempts)

