"""The shipped finance_sentiment data set: its files as the datasheet describes them, and the loader."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import fincluster.datasets
from fincluster.datasets import FinanceExample, FinanceSplit, Sentiment, load_finance_sentiment
from fincluster.errors import ConfigurationError, DatasetError

DATA = Path(__file__).resolve().parents[1] / "fincluster" / "datasets" / "finance_sentiment"
SPLITS: tuple[FinanceSplit, ...] = ("train", "validation")


def _records(split: str) -> list[dict[str, Any]]:
    lines = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


@pytest.mark.parametrize(("split", "per_label"), [("train", 100), ("validation", 20)])
def test_each_split_holds_exactly_its_count_per_label(split: str, per_label: int) -> None:
    counts = Counter(record["label"] for record in _records(split))
    assert counts == {"negative": per_label, "neutral": per_label, "positive": per_label}


@pytest.mark.parametrize("split", SPLITS)
def test_every_line_is_a_json_object_with_exactly_text_and_label(split: str) -> None:
    for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        assert isinstance(record, dict)
        assert sorted(record) == ["label", "text"]
        assert isinstance(record["text"], str)
        assert record["text"] == record["text"].strip() != ""


@pytest.mark.parametrize("split", SPLITS)
def test_every_label_is_one_of_the_three_sentiments(split: str) -> None:
    assert {record["label"] for record in _records(split)} <= {"negative", "neutral", "positive"}


def test_no_text_appears_twice_in_the_whole_data_set() -> None:
    texts = [" ".join(record["text"].lower().split()) for split in SPLITS for record in _records(split)]
    assert len(texts) == 360
    assert [text for text, count in Counter(texts).items() if count > 1] == []


def test_no_text_appears_in_both_splits() -> None:
    train = {record["text"] for record in _records("train")}
    validation = {record["text"] for record in _records("validation")}
    assert train & validation == set()


def test_no_validation_sentence_is_a_near_duplicate_of_a_train_sentence() -> None:
    """Word-set Jaccard similarity below 0.5 for every train/validation pair (the datasheet's bound)."""
    train = [_words(record["text"]) for record in _records("train")]
    validation = [_words(record["text"]) for record in _records("validation")]
    closest = max(len(a & b) / len(a | b) for a, b in itertools.product(train, validation))
    assert closest < 0.5


@pytest.mark.parametrize("split", SPLITS)
def test_loader_returns_what_the_file_contains_in_order(split: FinanceSplit) -> None:
    expected = [FinanceExample(text=r["text"], label=Sentiment(r["label"])) for r in _records(split)]
    assert load_finance_sentiment(split) == expected


def test_loader_gives_frozen_examples_with_enum_labels() -> None:
    example = load_finance_sentiment("validation")[0]
    assert type(example.label) is Sentiment
    with pytest.raises(AttributeError):
        example.text = "changed"  # type: ignore[misc]


def test_loader_refuses_an_unknown_split() -> None:
    with pytest.raises(ConfigurationError, match="'test'"):
        load_finance_sentiment("test")  # type: ignore[arg-type]


def test_loader_names_the_line_of_a_bad_label(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "finance_sentiment").mkdir()
    (tmp_path / "finance_sentiment" / "train.jsonl").write_text(
        '{"text": "Rates were unchanged.", "label": "neutral"}\n'
        '{"text": "Profits soared.", "label": "bullish"}\n'
    )
    monkeypatch.setattr(fincluster.datasets, "files", lambda package: tmp_path)
    with pytest.raises(DatasetError, match=r"finance_sentiment/train\.jsonl:2: label 'bullish'"):
        load_finance_sentiment("train")


def test_loader_refuses_a_line_with_an_extra_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "finance_sentiment").mkdir()
    (tmp_path / "finance_sentiment" / "validation.jsonl").write_text(
        '{"text": "Rates were unchanged.", "label": "neutral", "source": "wire"}\n'
    )
    monkeypatch.setattr(fincluster.datasets, "files", lambda package: tmp_path)
    with pytest.raises(DatasetError, match=r"validation\.jsonl:1: expected an object with exactly"):
        load_finance_sentiment("validation")
