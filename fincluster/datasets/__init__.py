"""Small labelled data sets that ship inside the package, so examples and tests can fine-tune offline.

``finance_sentiment``: 360 short, original sentences in the style of financial news, labelled
negative / neutral / positive and split 300 train / 60 validation (stratified); its datasheet is
``finance_sentiment/README.md``. The files are read through ``importlib.resources``, so they load
the same from a checkout, an installed wheel or a zip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from importlib.resources import files
from typing import Literal

from fincluster.errors import ConfigurationError, DatasetError

__all__ = ["FinanceExample", "FinanceSplit", "Sentiment", "load_finance_sentiment"]

FinanceSplit = Literal["train", "validation"]
_SPLITS: tuple[FinanceSplit, ...] = ("train", "validation")
_FIELDS = {"text", "label"}


class Sentiment(StrEnum):
    """What the news means for the holders of the named company's (or market's) securities."""

    NEGATIVE = "negative"
    NEUTRAL = "neutral"
    POSITIVE = "positive"


@dataclass(frozen=True, slots=True)
class FinanceExample:
    """One labelled sentence."""

    text: str
    label: Sentiment


def load_finance_sentiment(split: FinanceSplit) -> list[FinanceExample]:
    """The examples of one split, in file order."""
    if split not in _SPLITS:
        raise ConfigurationError(f"unknown finance_sentiment split {split!r}; use one of {list(_SPLITS)}")
    name = f"finance_sentiment/{split}.jsonl"
    resource = files(__name__) / "finance_sentiment" / f"{split}.jsonl"
    try:
        lines = resource.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read {name} from the fincluster package: {exc}") from exc
    return [_example(line, f"{name}:{number}") for number, line in enumerate(lines, start=1)]


def _example(line: str, where: str) -> FinanceExample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not a JSON object ({exc.msg})") from exc
    if not isinstance(record, dict) or set(record) != _FIELDS:
        raise DatasetError(f"{where}: expected an object with exactly the keys {sorted(_FIELDS)}")
    text, label = record["text"], record["label"]
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: 'text' must be a non-empty string")
    try:
        sentiment = Sentiment(label)
    except ValueError:
        raise DatasetError(f"{where}: label {label!r} is not one of {[s.value for s in Sentiment]}") from None
    return FinanceExample(text=text, label=sentiment)
