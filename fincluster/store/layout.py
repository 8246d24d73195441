"""Where each part of a model store lives, relative to the store's root (posix paths).

::

    manifest.json                     format version, model facts, SHA-256 of every other file
    config.json                       the transformers config (readable by AutoConfig)
    tokenizer.json, tokenizer_config.json, ...
                                      tokenizer files as transformers saves them, when the source had
                                      a tokenizer (stores imported before 0.2 keep them in tokenizer/)
    client.safetensors                embeddings, final norm, LM head (absent when tied)
    blocks/block_00000.safetensors    one decoder layer per file, keys relative to the layer

The root is a directory transformers can read: ``AutoConfig.from_pretrained(store)`` and
``AutoTokenizer.from_pretrained(store)`` work on it directly (without the manifest check that
``ModelStore.load_config`` / ``load_tokenizer`` make first).
"""

from __future__ import annotations

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
LEGACY_TOKENIZER_DIR = "tokenizer"
CLIENT_FILE = "client.safetensors"
BLOCKS_DIR = "blocks"


def is_weights_or_config(path: str) -> bool:
    """Whether store ``path`` is the config, the client part or a block (the rest is tokenizer files)."""
    return path in (CONFIG_FILE, CLIENT_FILE) or path.startswith(f"{BLOCKS_DIR}/")


def block_file(index: int) -> str:
    """The store path of decoder layer ``index``'s weights."""
    return f"{BLOCKS_DIR}/block_{index:05d}.safetensors"
