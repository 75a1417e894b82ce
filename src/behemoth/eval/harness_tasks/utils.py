"""Datasets of the behemoth task definitions, read from the JSON lines files beside this file (no network; the
harness loads this module by path, so it needs nothing from behemoth itself). Written by
`behemoth.eval.harness.export_tasks`; a test checks that they equal a fresh export."""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _load(name: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / name))})


def gen_dataset(**kwargs) -> datasets.DatasetDict:
    return _load("behemoth_tasks_gen.jsonl")


def mc_dataset(**kwargs) -> datasets.DatasetDict:
    return _load("behemoth_tasks_mc.jsonl")
