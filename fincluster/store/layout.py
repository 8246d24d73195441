"""Where each part of a model store lives, relative to the store's root (posix paths).

::

    manifest.json                     format version, model facts, SHA-256 of every other file
    config.json                       the transformers config (readable by AutoConfig)
    tokenizer/...                     tokenizer files, when the source had a tokenizer
    client.safetensors                embeddings, final norm, LM head (absent when tied)
    blocks/block_00000.safetensors    one decoder layer per file, keys relative to the layer
"""

from __future__ import annotations

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CLIENT_FILE = "client.safetensors"
BLOCKS_DIR = "blocks"


def block_file(index: int) -> str:
    """The store path of decoder layer ``index``'s weights."""
    return f"{BLOCKS_DIR}/block_{index:05d}.safetensors"
