"""The transfer protocol's parts: planning and reading buckets (pure), and a receiver committing
chunks into a real store across a restart."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import pytest

from dicomfs.samples import Corpus
from dicomfs.store import Instance, Level, Store
from dicomfs.transfers.protocol import (
    BadBucketError,
    Piece,
    Wanted,
    decode_bucket,
    encode_bucket,
    merge_ranges,
    missing_ranges,
    plan_buckets,
)
from dicomfs.transfers.receiving import Receiver
from dicomfs.transfers.sending import Outbox, StaleSelectionError, read_bucket


def test_small_instances_are_packed_in_order_and_large_ones_chunked() -> None:
    wanted = [Wanted("a", "h", 40), Wanted("b", "h", 50), Wanted("big", "h", 250), Wanted("c", "h", 30),
              Wanted("d", "h", 100)]
    buckets = plan_buckets(wanted, 100)
    # A large instance's chunks go out as they come; the small ones keep filling the open bucket.
    assert [[(p.id, p.offset, p.length) for p in bucket] for bucket in buckets] == [
        [("big", 0, 100)], [("big", 100, 100)], [("big", 200, 50)],
        [("a", 0, 40), ("b", 0, 50)],
        [("c", 0, 30)],
        [("d", 0, 100)],
    ]


def test_a_partly_received_instance_is_planned_for_its_missing_ranges_only() -> None:
    held = [(0, 100), (300, 400)]
    missing = tuple(missing_ranges(held, 450))
    assert missing == ((100, 300), (400, 450))
    buckets = plan_buckets([Wanted("big", "h", 450, missing)], 150)
    assert [(b[0].offset, b[0].length) for b in buckets] == [(100, 150), (250, 50), (400, 50)]
    assert merge_ranges([(5, 9), (0, 3), (3, 4), (8, 12)]) == [(0, 4), (5, 12)]


def test_a_bucket_reads_back_exactly_and_refuses_damage() -> None:
    a, b = "0" * 8 + "-aaaaaaaa" * 4, "0" * 8 + "-bbbbbbbb" * 4  # the manifest holds ids and SHA-256s of their format
    content = {a: b"x" * 10, b: b"yz" * 7}
    pieces = [Piece(a, hashlib.sha256(content[a]).hexdigest(), 10, 0, 10),
              Piece(b, hashlib.sha256(content[b]).hexdigest(), 14, 4, 6)]
    bucket = encode_bucket(pieces, lambda p: content[p.id][p.offset:p.offset + p.length])
    assert [(p, bytes(d)) for p, d in decode_bucket(bucket)] == [(pieces[0], b"x" * 10), (pieces[1], b"yzyzyz")]
    for broken, reason in [(b"XXXX" + bucket[4:], "bad magic"), (bucket[:-1], "ends inside"),
                           (bucket + b"!", "after the last piece"), (bucket[:4] + b"\x09" + bucket[5:], "version 9"),
                           (bucket[:12], "manifest is longer"), (bucket[:8], "shorter than its header")]:
        with pytest.raises(BadBucketError, match=reason):
            decode_bucket(broken)


@pytest.fixture
def stores(tmp_path: Path, large_corpus: Corpus, open_store: Callable[..., Store]) -> tuple[Store, Store, Instance]:
    """A store holding large instances, an empty one, and the largest instance."""
    sending = open_store(tmp_path / "sending")
    list(sending.ingest([large_corpus.root]))
    largest = max((r for r in sending.walk(Level.INSTANCE) if isinstance(r, Instance)), key=lambda r: r.size)
    return sending, open_store(tmp_path / "receiving"), largest


def test_chunks_survive_a_receiver_restart_and_only_the_missing_ones_travel(
        tmp_path: Path, stores: tuple[Store, Store, Instance]) -> None:
    sending, receiving, large = stores
    chunk = 64 << 10
    wanted = Wanted(large.id, large.sha256, large.size)
    buckets = plan_buckets([wanted], chunk)
    assert len(buckets) >= 4
    first = Receiver(receiving)
    for bucket in buckets[::2]:  # every other chunk arrives, then the receiver stops
        outcome = first.receive(decode_bucket(read_bucket(sending, bucket)))
        assert outcome.stored == [] and large.id in outcome.partial
    restarted = Receiver(receiving)
    found = restarted.lookup([wanted])
    assert found.have == [] and found.partial[large.id] == merge_ranges(
        (b[0].offset, b[0].offset + b[0].length) for b in buckets[::2])
    rest = plan_buckets([Wanted(large.id, large.sha256, large.size,
                                tuple(missing_ranges(found.partial[large.id], large.size)))], chunk)
    assert [b[0].offset for b in rest] == [b[0].offset for b in buckets[1::2]]
    outcomes = [restarted.receive(decode_bucket(read_bucket(sending, bucket))) for bucket in rest]
    assert outcomes[-1].stored == [large.id]
    stored = receiving.get(large.id)
    assert isinstance(stored, Instance) and stored.sha256 == large.sha256 and stored.origin == "transfer"
    assert restarted.lookup([wanted]).have == [large.id]
    assert not any((receiving.folder / "transfers" / "partial").iterdir())


def test_damaged_instances_are_not_kept(stores: tuple[Store, Store, Instance]) -> None:
    sending, receiving, large = stores
    whole = read_bucket(sending, [Piece(large.id, large.sha256, large.size, 0, large.size)])
    damaged = bytearray(whole)
    damaged[-100] ^= 0xFF
    assert Receiver(receiving).receive(decode_bucket(bytes(damaged))).damaged == [large.id]
    half = large.size // 2
    chunks = [Piece(large.id, large.sha256, large.size, 0, half), Piece(large.id, large.sha256, large.size, half,
                                                                          large.size - half)]
    receiver = Receiver(receiving)
    receiver.receive(decode_bucket(read_bucket(sending, chunks[:1])))
    last = bytearray(read_bucket(sending, chunks[1:]))
    last[-1] ^= 0xFF
    assert receiver.receive(decode_bucket(bytes(last))).damaged == [large.id]
    assert receiving.find(large.id) is None
    assert receiver.lookup([Wanted(large.id, large.sha256, large.size)]).partial == {}  # dropped whole, to resend


def test_a_plan_is_named_by_its_content_and_refuses_changed_instances(stores: tuple[Store, Store, Instance]) -> None:
    sending, _, large = stores
    outbox = Outbox(sending)
    plan = [[Piece(large.id, large.sha256, large.size, 0, 1000)]]
    name = outbox.register(plan)
    assert outbox.register(plan) == name
    assert bytes(decode_bucket(outbox.bucket(name, 0))[0][1]) == sending.open_instance(large.id).read(0, 1000)
    stale = outbox.register([[Piece(large.id, hashlib.sha256(b"other").hexdigest(), large.size, 0, 10)]])
    with pytest.raises(StaleSelectionError):
        outbox.bucket(stale, 0)


def test_an_instance_whose_chunks_all_arrived_before_a_kill_is_committed_at_the_next_lookup(
        stores: tuple[Store, Store, Instance]) -> None:
    sending, receiving, large = stores
    buckets = plan_buckets([Wanted(large.id, large.sha256, large.size)], 64 << 10)
    first = Receiver(receiving)
    for bucket in buckets[:-1]:
        first.receive(decode_bucket(read_bucket(sending, bucket)))
    # The last chunk reached the disk and its range was recorded, then the receiver was killed
    # before the commit: the state _add_chunk leaves just before it hands the file on.
    (last,) = buckets[-1]
    part = next((receiving.folder / "transfers" / "partial").glob("*.part"))
    with open(part, "r+b") as file:
        file.seek(last.offset)
        file.write(sending.open_instance(large.id).read(last.offset, last.length))
    with open(part.with_suffix(".ranges"), "a") as ranges:
        ranges.write(f"{last.offset} {last.offset + last.length}\n")
    assert receiving.find(large.id) is None
    found = Receiver(receiving).lookup([Wanted(large.id, large.sha256, large.size)])
    assert found.have == [large.id] and found.partial == {}  # nothing left to send: it is stored
    stored = receiving.get(large.id)
    assert isinstance(stored, Instance) and stored.sha256 == large.sha256
    assert not any((receiving.folder / "transfers" / "partial").iterdir())
