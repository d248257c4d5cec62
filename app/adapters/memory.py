"""The command service's store port in memory: versioned states by aggregate id and
answers by command id, a batch's kept apart until it commits, as the writer's
RocksDB-backed ``AggregateCache`` keeps them. For tests and tools that decide
commands without a broker; nothing here survives the process."""

from __future__ import annotations

from app.application.commands import VersionedState


class MemoryStore:
    def __init__(self) -> None:
        self.states: dict[str, VersionedState] = {}
        self.answers: dict[str, bytes] = {}
        self.pending: dict[str, VersionedState] = {}
        self.pending_answers: dict[str, bytes] = {}

    # The port CommandService uses.
    def load(self, aggregate_id: str) -> VersionedState | None:
        found = self.pending.get(aggregate_id)
        return found if found is not None else self.states.get(aggregate_id)

    def save(self, aggregate_id: str, versioned: VersionedState) -> None:
        self.pending[aggregate_id] = versioned

    def answered(self, command_id: str) -> bytes | None:
        found = self.pending_answers.get(command_id)
        return found if found is not None else self.answers.get(command_id)

    # The batch's side: what the processor does when its transaction ends.
    def remember_answer(self, command_id: str, value: bytes) -> None:
        self.pending_answers[command_id] = value

    def commit(self) -> None:
        self.states.update(self.pending)
        self.answers.update(self.pending_answers)
        self.drop()

    def drop(self) -> None:
        self.pending.clear()
        self.pending_answers.clear()
