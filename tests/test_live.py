"""Live output, the reader's side: state and output as resumable events, from the store and
the stream, in threads and in asyncio (the commands are moved along in-process)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
import redis

from producer.client import Producer
from producer.errors import BrokerUnavailable, InvalidEventId, NotFound
from producer.live import LiveEvent, afollow, follow
from producer.redaction import Redactor
from producer.spec import CommandSpec
from producer.states import State
from producer.store.clock import utcnow
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from tests.conftest import Env, wait_for
from workers.cli_show import print_record
from workers.live import LiveOutput


@pytest.fixture
def producer(make_env: Callable[..., Env], redis_url: str, tmp_path: object) -> Iterator[Producer]:
    env = make_env(f"sqlite:///{tmp_path}/live.db", redis_url)
    upgrade(make_engine(env.settings.database_url))
    with env.producer() as p:
        yield p


@pytest.fixture
def output(producer: Producer) -> Iterator[LiveOutput]:
    out = LiveOutput(producer.broker_url, producer.settings)
    yield out
    out.close()


def submitted(p: Producer) -> str:
    command_id = p.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "hi"])).id
    p.flush()  # published: its record changes no more until it is claimed
    return command_id


def claim(p: Producer, command_id: str) -> int:
    claimed = p.store.claim(command_id, tenant="alpha", worker="test", lease_s=30)
    assert claimed is not None
    return claimed.version


def finish(
    p: Producer, command_id: str, version: int, *, to: State = State.SUCCEEDED, **output: str
) -> None:
    p.store.transition(
        command_id,
        expect_state=State.RUNNING,
        expect_version=version,
        to=to,
        actor="test",
        exit_code=0 if to is State.SUCCEEDED else 1,
        finished_at=utcnow(),
        **output,
    )


def publish(out: LiveOutput, command_id: str, stream: str, text: str) -> None:
    with out.publishing(command_id, Redactor(), 1 << 20) as tap:
        tap.feed(stream, text.encode())


def shown(events: list[LiveEvent]) -> list[tuple[str, object]]:
    """Each event's kind and data, the end's as its state only."""
    return [
        (e.event, json.loads(e.data)["state"] if e.event == "end" else json.loads(e.data))
        for e in events
    ]


def test_a_command_that_ended_without_a_stream_gives_its_stored_output_and_record(
    producer: Producer, capsys: pytest.CaptureFixture[str]
) -> None:
    cid = submitted(producer)
    finish(producer, cid, claim(producer, cid), stdout="out\n", stderr="err\n")
    events = list(follow(producer, cid))
    assert shown(events) == [
        ("state", {"state": "succeeded", "version": 3}),
        ("stdout", {"text": "out\n"}),
        ("stderr", {"text": "err\n"}),
        ("end", "succeeded"),
    ]
    print_record(producer.get(cid, with_transitions=True), as_json=True)
    assert events[-1].data == capsys.readouterr().out.strip()  # as `execq status --json`


def test_output_comes_while_the_command_runs_and_the_end_after_the_last_of_it(
    producer: Producer, output: LiveOutput
) -> None:
    cid = submitted(producer)
    seen: list[LiveEvent] = []
    reader = threading.Thread(target=lambda: seen.extend(follow(producer, cid, poll_s=0.05)))
    reader.start()
    wait_for(lambda: seen, 10, "the pending state")
    version = claim(producer, cid)
    publish(output, cid, "stdout", "one\n")
    try:
        wait_for(lambda: shown(seen)[-1][0] == "stdout", 10, "the output while it runs")
    finally:
        publish(output, cid, "stderr", "two\n")
        finish(producer, cid, version, to=State.FAILED, stdout="one\n", stderr="two\n")
        reader.join(10)
    assert shown(seen) == [
        ("state", {"state": "pending", "version": 1}),
        ("state", {"state": "running", "version": 2}),
        ("stdout", {"text": "one\n"}),
        ("stderr", {"text": "two\n"}),
        ("state", {"state": "failed", "version": 3}),
        ("end", "failed"),
    ]
    assert len({e.id for e in seen}) == len(seen)


def test_a_follower_resumed_after_an_event_gets_exactly_what_came_after_it(
    producer: Producer, output: LiveOutput
) -> None:
    cid = submitted(producer)
    version = claim(producer, cid)
    publish(output, cid, "stdout", "one\n")
    first = follow(producer, cid, poll_s=0.05)
    assert next(first).event == "state"
    last = next(first)
    assert shown([last]) == [("stdout", {"text": "one\n"})]
    first.close()  # the client went away here
    publish(output, cid, "stdout", "two\n")
    publish(output, cid, "stderr", "three\n")
    finish(producer, cid, version)
    resumed = list(follow(producer, cid, after=last.id))
    assert shown(resumed) == [
        ("stdout", {"text": "two\n"}),
        ("stderr", {"text": "three\n"}),
        ("state", {"state": "succeeded", "version": 3}),
        ("end", "succeeded"),
    ]
    # From any event of the whole stream on: the rest of it, once.
    whole = list(follow(producer, cid))
    for i, event in enumerate(whole):
        assert list(follow(producer, cid, after=event.id)) == whole[i + 1 :]


def test_after_the_end_a_resume_waits_for_the_command_to_change_again(
    producer: Producer,
) -> None:
    cid = submitted(producer)
    finish(producer, cid, claim(producer, cid), to=State.FAILED, stdout="x\n")
    end = list(follow(producer, cid))[-1]
    assert end.event == "end" and list(follow(producer, cid, after=end.id)) == []
    producer.retry(cid)
    assert shown(list(follow(producer, cid, after=end.id, follow=False))) == [
        ("state", {"state": "pending", "version": 4})
    ]


def test_without_follow_a_running_command_gives_what_was_published_so_far(
    producer: Producer, output: LiveOutput
) -> None:
    cid = submitted(producer)
    claim(producer, cid)
    publish(output, cid, "stdout", "so far\n")
    assert shown(list(follow(producer, cid, follow=False))) == [
        ("state", {"state": "running", "version": 2}),
        ("stdout", {"text": "so far\n"}),
    ]


def test_unknown_commands_bad_event_ids_and_a_missing_redis_are_errors(
    producer: Producer,
) -> None:
    with pytest.raises(NotFound):
        follow(producer, "00000000-0000-4000-8000-000000000000")
    cid = submitted(producer)
    for bad in ("x", "1-2", "1-2-3-4", "-1-0-0", "1-0-0-done"):
        with pytest.raises(InvalidEventId):
            follow(producer, cid, after=bad)
    producer.broker_url = "redis://127.0.0.1:1/0"
    with pytest.raises(BrokerUnavailable):
        list(follow(producer, cid))


# --- asyncio -------------------------------------------------------------------------------


def test_an_async_follower_gets_output_as_it_comes_then_the_end(
    producer: Producer, output: LiveOutput
) -> None:
    cid = submitted(producer)
    version = claim(producer, cid)

    def run_command() -> None:
        time.sleep(0.2)
        publish(output, cid, "stdout", "late\n")
        finish(producer, cid, version, stdout="late\n")

    async def main() -> list[LiveEvent]:
        worker = threading.Thread(target=run_command)
        worker.start()
        events = [e async for e in afollow(producer, cid, poll_s=0.05)]
        worker.join()
        return events

    assert shown(asyncio.run(main())) == [
        ("state", {"state": "running", "version": 2}),
        ("stdout", {"text": "late\n"}),
        ("state", {"state": "succeeded", "version": 3}),
        ("end", "succeeded"),
    ]


def redis_clients_of_this_process(client: redis.Redis) -> int:
    """Connections the Redis server lists from this process (CLIENT LIST, by address)."""
    mine = {
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_ESTABLISHED
    }
    return sum(1 for c in client.client_list() if c["addr"] in mine)


def test_two_hundred_followers_that_stop_early_leave_no_connection_or_task(
    producer: Producer, output: LiveOutput, redis_url: str
) -> None:
    cid = submitted(producer)
    claim(producer, cid)
    publish(output, cid, "stdout", "hello\n")
    admin = redis.Redis.from_url(redis_url)
    admin.ping()
    baseline = redis_clients_of_this_process(admin)

    async def main() -> tuple[int, list[asyncio.Task[object]]]:
        reading = asyncio.Semaphore(0)

        async def leaves_after_one_line(n: int) -> None:
            stream = afollow(producer, cid, poll_s=5)
            async for event in stream:
                if event.event == "stdout":
                    reading.release()
                    if n % 2:
                        await stream.aclose()  # it stops asking
                        return
                    # Else it waits for more until cancelled (the client disconnects).

        tasks = [asyncio.create_task(leaves_after_one_line(n)) for n in range(200)]
        for _ in tasks:
            await asyncio.wait_for(reading.acquire(), 30)
        during = redis_clients_of_this_process(admin)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return during, left

    during, left = asyncio.run(main())
    assert during >= baseline + 100  # the waiting half held a connection each
    assert left == []
    deadline = time.monotonic() + 5
    while redis_clients_of_this_process(admin) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_clients_of_this_process(admin) == baseline
    admin.close()
