"""Rounds are partitions of a dynamic partitions definition: keys r0001, r0002, ..."""

from __future__ import annotations

import re

import dagster as dg

fl_round = dg.DynamicPartitionsDefinition(name="fl_round")

_KEY = re.compile(r"r(\d+)")


def round_key(number: int) -> str:
    return f"r{number:04d}"


def round_number(key: str) -> int:
    """1 for "r0001"; 0 for keys that are not numbered rounds."""
    match = _KEY.fullmatch(key)
    return int(match.group(1)) if match else 0


def next_round_key(instance: dg.DagsterInstance) -> str:
    existing = instance.get_dynamic_partitions(fl_round.name)
    return round_key(max((round_number(k) for k in existing), default=0) + 1)
