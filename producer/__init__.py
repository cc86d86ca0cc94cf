"""What web backends import: the command spec and the Producer client."""

from __future__ import annotations

from producer.client import Producer, SubmitResult
from producer.record import CommandRecord
from producer.spec import CommandSpec
from producer.states import State

__all__ = ["CommandRecord", "CommandSpec", "Producer", "State", "SubmitResult"]
