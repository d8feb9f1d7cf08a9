"""The :class:`tenantflow.kernel.storage.Storage` contract over an ordered transactional key-value
layer (FoundationDB, or LMDB in CI), with the SQLite engine's semantics.

Every write is one layer transaction, retried whole by the layer, so each is idempotent: ``apply``
writes its batch id (chosen before the retry loop) next to each instance it touched, and a retry
that finds it returns the results recorded then instead of applying the batch twice.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from tenantflow.kernel.errors import AlreadyExists, ResourceExhausted, Unavailable
from tenantflow.kernel.model import (
    SKIPPED,
    SPENT,
    ApplyResult,
    Artifact,
    ArtifactVersion,
    Change,
    EventRecord,
    HistoryEntry,
    InstanceRecord,
    ScheduleRecord,
    Status,
    StepRecord,
    TenantSummary,
    inbox_refusal,
)
from tenantflow.kernel.tenantkv import NO_QUOTA, KVEntry, KVQuota, KVUsage, KVWrite
from tenantflow.plugins.storage_fdb import artifacts, claims, leases, schedules, tenantkv
from tenantflow.plugins.storage_fdb.indexes import delete, reindex
from tenantflow.plugins.storage_fdb.keys import Keys, pack, part, unpack
from tenantflow.plugins.storage_fdb.layer import (
    CHUNK_BYTES,
    MAX_TXN_BYTES,
    RETRYABLE,
    Layer,
    Txn,
    decode_int,
    encode_int,
    maybe_committed,
)
from tenantflow.plugins.storage_fdb.prefetch import Prefetched
from tenantflow.plugins.storage_fdb.records import (
    ENVELOPE,
    RESULT,
    Head,
    dumps,
    group_chunks,
    join_chunks,
    loads,
    put_blob,
    record,
    size,
    step_json,
)
from tenantflow.plugins.storage_fdb.tenants import list_page as list_tenant_page

log = logging.getLogger(__name__)
_SETTABLE = frozenset(
    {"status", "output_json", "error_name", "error_message", "error_traceback", "run_at", "lease_owner",
     "lease_until", "code"}  # code: Upgrade re-pins an instance
)  # fmt: skip
PAGE = 100  # instances deleted or released per transaction
FILTER_SCAN = 2000  # index entries a filtered List reads per call before it returns a short page


def _matcher(
    workflow: str, created_after: float | None, created_before: float | None
) -> Callable[[InstanceRecord], bool] | None:
    """The test of List's filters beyond status (None: none given)."""
    if not workflow and created_after is None and created_before is None:
        return None
    return lambda r: (
        (not workflow or r.workflow == workflow)
        and (created_after is None or r.created_at >= created_after)
        and (created_before is None or r.created_at < created_before)
    )


MAYBE_AGAIN = 3  # runs of idempotent work after an error that may have committed
T = TypeVar("T")
# What a transaction costs is counted as FoundationDB counts it: mutations (key and value) plus
# read and write conflict ranges (both ends of each). Every key of an instance holds its tenant and
# id, so a key is counted about four times: its mutation, its write conflict range's two ends, and
# (for about one key in two) a read conflict range's two ends. Keys an instance change writes, at
# most: head, marker, status index and counters, run queue; per step, event and history entry below.
# Measured at the longest ids the validators allow, a 512-change batch costs 12,300 bytes a change
# with empty results; estimated 14,000 (tests/plugins/storage_fdb/test_size_budget.py).
_KEY_EXTRA = 60  # root framing, tuple codes and the other elements (a long name: a 33-byte digest)
_KEYS_PER_CHANGE, _KEYS_PER_STEP, _KEYS_PER_EVENT, _KEYS_PER_HISTORY = 5, 3, 3, 2
_KEYS_PER_INSTANCE = 12  # a create: head, envelope, marker, indexes, counters, queue, lease, history


def _key_cost(root: str, tenant: str, id: str) -> int:
    return 4 * (_KEY_EXTRA + size(root) + size(tenant) + size(id))


def _change_bytes(ch: Change, root: str = "tenantflow") -> int:
    """At least what ``ch`` costs in a transaction, as FoundationDB counts (see above)."""
    keys = _KEYS_PER_CHANGE + _KEYS_PER_STEP * len(ch.steps) + _KEYS_PER_EVENT * len(ch.add_events)
    keys += _KEYS_PER_HISTORY * len(ch.history) + 2 * len(ch.consume_events)
    total = keys * _key_cost(root, ch.tenant, ch.id) + sum(size(str(v)) for v in ch.set.values())
    total += sum(
        size(s.output_json) + size(s.error_message) + size(s.error_traceback) + 2 * size(s.key) + 300
        for s in ch.steps
    )
    total += sum(size(e.payload_json) + size(e.type) + 200 for e in ch.add_events)
    total += sum(4 * (_KEY_EXTRA + size(ch.tenant) + size(key)) + size(v or "") + 100 for key, v in ch.kv)
    # a read set: read conflict ranges count too (a key's, a page's and each key it saw)
    total += sum(2 * (_KEY_EXTRA + size(ch.tenant) + size(key)) for key, _ in ch.kv_reads)
    total += sum(2 * (_KEY_EXTRA + size(ch.tenant) + size(r.prefix) + sum(size(key) for key, _ in r.seen))
                 for r in ch.kv_ranges)  # fmt: skip
    return total + sum(size(h.message) + size(h.data_json) + 200 for h in ch.history)


def _create_bytes(r: InstanceRecord, root: str) -> int:
    """At least what creating ``r`` costs: its keys are written (mutation and write conflict range)
    and hardly read. Measured: 1,500 bytes an instance with short ids, 7,900 at the longest."""
    values = size(r.params_json) + size(r.output_json) + size(r.code) + size(r.workflow) + size(r.module)
    key = 40 + size(root) + size(r.tenant) + size(r.id)
    return _KEYS_PER_INSTANCE * 3 * key + values + 300


class KVStorage:
    """Storage over a :class:`~tenantflow.plugins.storage_fdb.layer.Layer`, under root subspace ``root``."""

    def __init__(self, layer: Layer, *, root: str = "tenantflow") -> None:
        self.layer = layer
        self.k = Keys(root)
        self._cursor = claims.Cursor()  # where this node's next claim starts reading ready tenants

    def _idempotent(self, fn: Callable[[Txn], T]) -> T:
        """``transact`` for work that finds its own earlier commit (ids chosen before the call):
        after an error that leaves open whether it applied (a time-out, which since API 610 covers
        every try, or an unknown result), run it again, so the caller is never told it failed when
        it applied; if that keeps happening, say so."""
        for attempt in range(MAYBE_AGAIN + 1):
            try:
                return self.layer.transact(fn)
            except Exception as exc:
                if not maybe_committed(exc):
                    if getattr(exc, "code", None) in RETRYABLE:  # the layer retried it to its limit
                        raise Unavailable(
                            f"the storage did not commit the write ({exc}) after retrying it to its limit: "
                            "the cluster is overloaded or the data contended; retry: the operation is "
                            "idempotent"
                        ) from None
                    raise
                if attempt == MAYBE_AGAIN:
                    raise Unavailable(
                        f"the storage did not confirm whether the write committed ({exc}), {MAYBE_AGAIN + 1} "
                        "times: the cluster is slow or unreachable; retry: the operation is idempotent"
                    ) from None
        raise AssertionError("unreachable")

    # -- artifacts ------------------------------------------------------------------------------
    def put_artifact(self, artifact: Artifact) -> None:
        k, a = self.k, artifact
        meta_key = k.tenant(a.tenant, "a", a.name, "m", a.digest)
        if self.layer.read(lambda tr: tr.get(meta_key)) is None:
            # Up to 10 MiB of files: written in several transactions, then made visible by the meta
            # key. Content-addressed, so a retry or a concurrent publisher writes the same bytes.
            names = sorted(a.files)
            data = dumps([[n, len(a.files[n])] for n in names]) + b"\n" + b"".join(a.files[n] for n in names)
            chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
            base = k.tenant(a.tenant, "a", a.name, "f", a.digest)
            per_txn = MAX_TXN_BYTES // CHUNK_BYTES

            for first in range(0, len(chunks), per_txn):

                def write(tr: Txn, first: int = first) -> None:
                    for n in range(first, min(first + per_txn, len(chunks))):
                        tr.set(base + pack((n,)), chunks[n])

                self._idempotent(write)
        meta = dumps({"runtime": a.runtime, "workflows": a.workflows, "created_at": a.created_at})

        def publish(tr: Txn) -> None:
            if tr.get(meta_key) is None:
                tr.set(meta_key, meta)
            tr.set(k.tenant(a.tenant, "a", a.name, "latest"), a.digest.encode())  # latest again
            artifacts.index_version(tr, k, a.tenant, a.name, a.digest)

        self._idempotent(publish)  # sets of the same values: idempotent

    def get_artifact(self, tenant: str, name: str, digest: str | None) -> Artifact | None:
        k = self.k

        def read(tr: Txn) -> Artifact | None:
            want = digest
            if want is None:
                latest = tr.get(k.tenant(tenant, "a", name, "latest"))
                if latest is None:
                    return None
                want = latest.decode()
            meta = tr.get(k.tenant(tenant, "a", name, "m", want))
            if meta is None:
                return None
            data = join_chunks(tr.get_range(*k.tenant_range(tenant, "a", name, "f", want)))
            header, _, body = data.partition(b"\n")
            files, at = {}, 0
            for file, length in loads(header):
                files[file] = body[at : at + length]
                at += length
            m = loads(meta)
            return Artifact(tenant, name, want, m["runtime"], files, m["workflows"], m["created_at"])

        return self.layer.read(read)

    def list_artifacts(
        self, tenant: str, name: str | None, cursor: str | None, limit: int
    ) -> tuple[list[ArtifactVersion], str | None]:
        return artifacts.list_versions(self.layer, self.k, tenant, name, cursor, limit)

    # -- instances ------------------------------------------------------------------------------
    def create_instances(
        self, records: Sequence[InstanceRecord], history: Sequence[HistoryEntry], max_live: int = 0
    ) -> None:
        needed = sum(_create_bytes(r, self.k.root[0]) for r in records)
        if needed > MAX_TXN_BYTES:
            raise ResourceExhausted(
                f"these {len(records)} instances need {needed} bytes in one transaction and the limit is "
                f"{MAX_TXN_BYTES}: create them in smaller batches"
            )
        batch_id = uuid.uuid4().hex  # outside the retry loop: a retry recognises its own commit
        self._idempotent(lambda tr: self._create(tr, records, history, max_live, batch_id))

    def _create(
        self,
        tr: Txn,
        records: Sequence[InstanceRecord],
        history: Sequence[HistoryEntry],
        max_live: int,
        batch_id: str,
    ) -> None:
        k = self.k
        if records:
            marker = tr.get(k.inst(records[0].tenant, records[0].id, "x"))
            if marker is not None and loads(marker)["batch"] == batch_id:
                return  # this very create committed on an earlier try
        adding = Counter(r.tenant for r in records)
        tenants = list(adding)
        # Read for real: the tenants' creation counters (so creates in one tenant conflict), and
        # whether the instances exist; all at once.
        found = tr.get_many(
            [k.tenant(t, "c") for t in tenants] + [k.inst(r.tenant, r.id, "h") for r in records]
        )
        seqs = {t: decode_int(raw) for t, raw in zip(tenants, found, strict=False)}
        if max_live:
            self._check_live(tr, adding, max_live)
        seen: set[tuple[str, str]] = set()
        for r, head_before in zip(records, found[len(tenants) :], strict=True):
            if (r.tenant, r.id) in seen or head_before is not None:
                raise AlreadyExists(
                    f"instance {r.id!r} already exists in tenant {r.tenant!r}; "
                    "pick another id or leave it empty to get a generated one"
                )
            seen.add((r.tenant, r.id))
            seqs[r.tenant] += 1
            conc = (r.workflow, r.concurrency_key, r.concurrency_limit)
            head = Head(Status(r.status), r.run_at, r.generation, r.lease_owner, r.lease_until,
                        r.created_at, r.updated_at, seqs[r.tenant],
                        conc if r.concurrency_key or r.concurrency_limit else None)  # fmt: skip
            tr.set(k.inst(r.tenant, r.id, "h"), head.encode())
            put_blob(tr, k.inst(r.tenant, r.id, "e"), dumps({f: getattr(r, f) for f in ENVELOPE}))
            if r.output_json or r.error_name or r.error_message or r.error_traceback:
                put_blob(tr, k.inst(r.tenant, r.id, "o"), dumps({f: getattr(r, f) for f in RESULT}))
            reindex(tr, k, r.tenant, r.id, None, head)
            tr.set(k.inst(r.tenant, r.id, "wi"), b"")  # its waiting steps are indexed (see _waited_for)
            tr.set(k.inst(r.tenant, r.id, "x"), dumps({"batch": batch_id, "results": []}))
        for tenant, last in seqs.items():
            tr.set(k.tenant(tenant, "c"), encode_int(last))
        for r, entry in zip(records, history, strict=False):
            self._history(tr, r.tenant, r.id, [entry], last=0)  # a new instance: no history yet

    def _check_live(self, tr: Txn, adding: Counter[str], max_live: int) -> None:
        """Refuse a create that would take a tenant past ``max_live`` instances not ended. The live
        counter is kept by atomic adds and read here with a snapshot read, so the status changes
        that end instances (and add to it) never conflict with a create; what could take the count
        up meanwhile does: other creates (through the creation counter they all read and write) and
        an ended instance run again (it adds to ``"lr"``, which a create reads for real here). A
        count a concurrent end made stale only errs towards refusing."""
        k = self.k
        counts = tr.get_many([k.tenant(t, "live") for t in adding], snapshot=True)
        for (tenant, more), raw in zip(adding.items(), counts, strict=True):
            tr.add_read_conflict_key(k.tenant(tenant, "lr"))
            live = decode_int(raw)
            if live + more > max_live:
                raise ResourceExhausted(
                    f"tenant {tenant!r} has {live} live instances and the limit is {max_live}: wait for "
                    "some to complete, or terminate them, then create again"
                )

    def _load(self, tr: Txn, tenant: str, id: str) -> InstanceRecord | None:
        return self._load_many(tr, [(tenant, id)])[0]

    def _load_many(self, tr: Txn, keys: Sequence[tuple[str, str]]) -> list[InstanceRecord | None]:
        """Instances, their reads sent at once."""
        k = self.k
        found_keys = [k.inst(tenant, id, "h") for tenant, id in keys]
        found_keys += [k.tenant(tenant, "k", id) for tenant, id in keys]  # the lease's current end
        heads_and_leases = tr.get_many(found_keys)
        heads, ends = heads_and_leases[: len(keys)], heads_and_leases[len(keys) :]
        blobs = tr.get_ranges(
            [(*k.inst_range(tenant, id, part), 0) for tenant, id in keys for part in ("e", "o")]
        )
        found: list[InstanceRecord | None] = []
        for n, ((tenant, id), raw) in enumerate(zip(keys, heads, strict=True)):
            if raw is None or not blobs[2 * n]:
                found.append(None)
                continue
            result = loads(join_chunks(blobs[2 * n + 1])) if blobs[2 * n + 1] else {}
            head = Head.decode(raw)
            if head.lease_owner is not None:
                head = head.replace(lease_until=leases.until_of(ends[n]))
            found.append(record(tenant, id, head, loads(join_chunks(blobs[2 * n])), result))
        return found

    def get_instance(self, tenant: str, id: str) -> InstanceRecord | None:
        return self.layer.read(lambda tr: self._load(tr, tenant, id))

    def list_instances(
        self,
        tenant: str,
        status: Status | None,
        cursor: str | None,
        limit: int,
        *,
        workflow: str = "",
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[InstanceRecord], str | None]:
        after = int(cursor) if cursor else 0
        keep = _matcher(workflow, created_after, created_before)
        if keep is None:  # the index alone says which instances: read exactly a page
            page = self._indexed(tenant, status, after, limit + 1)
            more = len(page) > limit
            page = page[:limit]
            found = [r for _, r in self._loaded(tenant, page)]
            return found, (str(page[-1][0]) if more and page else None)
        # Filtered: read the index in chunks and keep what matches, up to FILTER_SCAN entries a call
        # (then a short page, with the cursor where the scan stopped).
        taken: list[InstanceRecord] = []
        scanned = 0
        while scanned < FILTER_SCAN:
            chunk = self._indexed(tenant, status, after, 200)
            if not chunk:
                return taken, None
            for seq, inst in self._loaded(tenant, chunk):
                after = seq
                if keep(inst):
                    taken.append(inst)
                    if len(taken) == limit:
                        return taken, str(seq)
            after = chunk[-1][0]
            scanned += len(chunk)
        return taken, str(after)

    def count_instances(
        self,
        tenant: str,
        status: Status | None,
        *,
        workflow: str = "",
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> int:
        keep = _matcher(workflow, created_after, created_before)
        count, after = 0, 0
        while chunk := self._indexed(tenant, status, after, 1000):  # one read transaction a chunk
            after = chunk[-1][0]
            count += len(chunk) if keep is None else sum(1 for _, r in self._loaded(tenant, chunk) if keep(r))
        return count

    def _indexed(self, tenant: str, status: Status | None, after: int, limit: int) -> list[tuple[int, str]]:
        """(creation seq, id) of the tenant's instances (of ``status``) after ``after``, in order."""
        index: tuple[Any, ...] = ("l",) if status is None else ("s", int(status))
        begin = self.k.tenant(tenant, *index, after + 1)
        end = self.k.tenant_range(tenant, *index)[1]
        rows = self.layer.read(lambda tr: tr.get_range(begin, end, limit=limit))
        return [(int(self.k.strip(key)[-1]), value.decode()) for key, value in rows]

    def _loaded(self, tenant: str, page: list[tuple[int, str]]) -> list[tuple[int, InstanceRecord]]:
        """The instances of ``page`` that still exist, with their seq."""
        found: list[tuple[int, InstanceRecord]] = []
        for start in range(0, len(page), 20):  # large params: a few instances per read transaction
            group = page[start : start + 20]
            loaded = self.layer.read(lambda tr, g=group: self._load_many(tr, [(tenant, id) for _, id in g]))  # type: ignore[misc]
            found += [(seq, r) for (seq, _), r in zip(group, loaded, strict=True) if r is not None]
        return found

    def get_steps(self, tenant: str, id: str) -> list[StepRecord]:
        rows = self.layer.read(lambda tr: tr.get_range(*self.k.inst_range(tenant, id, "s")))
        steps = [StepRecord(**loads(value)) for _, value in group_chunks(rows, 0)]
        return sorted(steps, key=lambda s: s.seq)

    def steps_bytes(self, tenant: str, id: str) -> int | None:
        """Bytes of the journal as stored (each step's JSON), from the sizes its seq index keeps:
        one range read of ~60 bytes a step, no step loaded. None if a step was written before
        the index kept sizes (then a Get is budgeted once loaded)."""
        rows = self.layer.read(lambda tr: tr.get_range(*self.k.inst_range(tenant, id, "sq")))
        if any(not value for _, value in rows):
            return None
        return sum(decode_int(value) for _, value in rows)

    def events_bytes(self, tenant: str, id: str) -> int | None:
        """Bytes of the instance's events, read and unread (types and payloads), from the counter
        event writes keep by atomic add (events are never deleted but with their instance): one
        point read. None for an inbox begun before the counter was kept."""
        last, counted = self.layer.read(
            lambda tr: tr.get_many([self.k.inst(tenant, id, "vn"), self.k.inst(tenant, id, "vb")])
        )
        if not decode_int(last):
            return 0
        return None if counted is None else decode_int(counted)

    def get_events(
        self, tenant: str, id: str, *, unconsumed_only: bool, type: str | None = None, limit: int = 0
    ) -> list[EventRecord]:
        k = self.k

        def unread_of_type(tr: Txn, type: str) -> list[EventRecord]:
            """Through the index of unread events by type: no other event is read."""
            rows = tr.get_range(*k.inst_range(tenant, id, "w", part(type)), limit=limit)
            events = []
            for key, _ in rows:
                seq = k.strip(key)[-1]
                e = loads(join_chunks(tr.get_range(*k.inst_range(tenant, id, "v", seq))))
                if e["type"] == type:  # a long type's key element is its digest
                    events.append(EventRecord(seq, e["type"], e["payload_json"], e["created_at"]))
            return events

        def read(tr: Txn) -> list[EventRecord]:
            if unconsumed_only and type is not None:
                return unread_of_type(tr, type)
            consumed = {
                k.strip(key)[-1]: value.decode()
                for key, value in tr.get_range(*k.inst_range(tenant, id, "vc"))
            }
            events = []
            for items, value in group_chunks(tr.get_range(*k.inst_range(tenant, id, "v")), 0):
                seq = items[-1]
                if unconsumed_only and seq in consumed:
                    continue
                e = loads(value)
                if type is not None and e["type"] != type:
                    continue
                events.append(
                    EventRecord(seq, e["type"], e["payload_json"], e["created_at"], consumed.get(seq, ""))
                )
                if len(events) == limit:
                    break
            return events

        return self.layer.read(read)

    def get_history(self, tenant: str, id: str, after_seq: int, limit: int) -> list[HistoryEntry]:
        begin = self.k.inst(tenant, id, "y", after_seq + 1)
        end = self.k.inst(tenant, id, "y", after_seq + limit + 1)
        rows = self.layer.read(lambda tr: tr.get_range(begin, end))
        return [HistoryEntry(**loads(value)) for _, value in group_chunks(rows, 0)]

    def _history(
        self, tr: Txn, tenant: str, id: str, entries: Sequence[HistoryEntry], last: int | None = None
    ) -> None:
        """Append ``entries`` to the instance's history; ``last``: its last seq, if known (not read)."""
        if not entries:
            return
        counter = self.k.inst(tenant, id, "yn")
        last = decode_int(tr.get(counter)) if last is None else last
        for entry in entries:
            last += 1
            entry.seq = last
            put_blob(tr, self.k.inst(tenant, id, "y", last), dumps(entry.__dict__))
        tr.set(counter, encode_int(last))

    # -- the write path of running instances ----------------------------------------------------
    def apply(self, changes: Sequence[Change]) -> list[ApplyResult]:
        # One transaction per batch (group commit), unless the batch would pass the transaction
        # size limit: then it is split between units (a change and its riders), each unit atomic.
        units: list[list[Change]] = []
        for ch in changes:
            if ch.after_previous and units:
                units[-1].append(ch)
            else:
                units.append([ch])
        groups: list[list[Change]] = []
        used = 0
        for unit in units:
            grown = sum(_change_bytes(ch, self.k.root[0]) for ch in unit)
            if not groups or used + grown > MAX_TXN_BYTES:
                groups.append([])
                used = 0
            groups[-1] += unit
            used += grown
        results: list[ApplyResult] = []
        for group in groups:
            batch_id = uuid.uuid4().hex  # outside the retry loop: a retry recognises its own commit
            try:
                # Run again after a time-out too, as after an unknown result: a try finds the
                # batch's own earlier commit by its id and returns what it recorded then.
                results += self._idempotent(lambda tr, g=group, b=batch_id: self._apply_batch(tr, g, b))  # type: ignore[misc]
            except Exception as exc:
                maybe = maybe_committed(exc) or isinstance(exc, Unavailable)  # retried: unknown still
                if not results and not maybe:
                    raise  # nothing applied: the caller may retry the changes
                # Part of the batch committed, or this part may have: raising would have the caller
                # apply it all again. The rest is reported not applied (or not known to be).
                reason = (
                    f"storage could not tell whether the change committed ({exc}): the instance "
                    "replays from storage after its lease"
                    if maybe
                    else f"storage failed ({exc}); the change was not applied"
                )
                return results + [ApplyResult(False, reason)] * (len(changes) - len(results))
        return results

    def _first_reads(self, changes: Sequence[Change]) -> list[bytes]:
        """The keys ``_apply_one`` reads of ``changes`` before writing them, so all are sent at once
        (one round trip instead of one per read: 1,536 for a 512-change batch)."""
        k, keys = self.k, []
        for ch in changes:
            t, i = ch.tenant, ch.id
            keys += [k.inst(t, i, "x"), k.inst(t, i, "h")]
            keys += [k.inst(t, i, "sk", part(step.key)) for step in ch.steps]
            if ch.history or ch.pause_aware:
                keys.append(k.inst(t, i, "yn"))
            if ch.add_events:
                keys += [k.inst(t, i, "vn"), k.inst(t, i, "vb")]
            if ch.wake_waiting:
                keys.append(k.inst(t, i, "wi"))
            for seq, _ in ch.consume_events:
                keys += [k.inst(t, i, "v", seq, 0), k.inst(t, i, "vc", seq)]
        return keys

    def _apply_batch(self, tr: Txn, changes: list[Change], batch_id: str) -> list[ApplyResult]:
        tr = Prefetched(tr, self._first_reads(changes))
        done: dict[tuple[str, str], dict[int, ApplyResult] | None] = {}
        mine: dict[tuple[str, str], list[tuple[int, ApplyResult]]] = {}
        results: list[ApplyResult] = []
        main_ok = True  # whether the main change the next rider rides on applied
        for pos, ch in enumerate(changes):
            if ch.after_previous and not main_ok:
                results.append(ApplyResult(False, SKIPPED))
                continue
            key = (ch.tenant, ch.id)
            if key not in done:
                raw = tr.get(self.k.inst(ch.tenant, ch.id, "x"))
                marker = loads(raw) if raw is not None else None
                done[key] = (
                    {
                        p: ApplyResult(
                            ok,
                            reason,
                            seqs,
                            Status(s) if s is not None else None,
                            (unread[0][0], unread[0][1]) if unread and unread[0] else None,
                            unread[1] if len(unread) > 1 else "",  # kv_refused: newer markers
                            unread[2] if len(unread) > 2 else "",  # kv_conflict: newer still
                        )
                        for p, ok, reason, seqs, s, *unread in marker["results"]  # unread: newer markers
                    }  # fmt: skip
                    if marker is not None and marker["batch"] == batch_id
                    else None
                )
            earlier = done[key]
            if earlier is not None:  # this batch committed before (the commit reported unknown)
                result = earlier[pos]
            else:
                result = self._apply_one(tr, ch)
            results.append(result)
            if not ch.after_previous:
                main_ok = result.ok
            if earlier is not None:
                continue
            if result.ok or result.reason != f"instance {ch.id!r} does not exist":
                mine.setdefault(key, []).append((pos, result))
        for (tenant, id), applied in mine.items():
            rows = [[p, r.ok, r.reason, r.event_seqs, int(r.status) if r.status is not None else None, r.unread,
                     r.kv_refused, r.kv_conflict] for p, r in applied]  # fmt: skip
            tr.set(self.k.inst(tenant, id, "x"), dumps({"batch": batch_id, "results": rows}))
        return results

    def _apply_one(self, tr: Txn, ch: Change) -> ApplyResult:
        k, t, i = self.k, ch.tenant, ch.id
        raw = tr.get(k.inst(t, i, "h"))
        if raw is None:
            return ApplyResult(False, f"instance {i!r} does not exist")
        old = Head.decode(raw)
        if ch.generation is not None and old.generation != ch.generation:
            return ApplyResult(False, "the instance was restarted or terminated meanwhile")
        if ch.owner is not None and old.lease_owner != ch.owner:
            return ApplyResult(False, "the lease on the instance was lost")
        if ch.expect_status and old.status not in ch.expect_status:
            return ApplyResult(False, f"the instance is {old.status.name.lower()}", status=old.status)
        values = dict(ch.set)
        unknown = set(values) - _SETTABLE
        if unknown:
            raise ValueError(f"cannot set instance columns {sorted(unknown)}")
        history = list(ch.history)
        if (
            ch.pause_aware
            and old.status == Status.WAITING_FOR_PAUSE
            and values.get("status") not in (Status.COMPLETE, Status.ERRORED)
        ):
            values.update(status=Status.PAUSED, run_at=None)
            history = [h for h in history if h.kind != "status"]
            history.append(HistoryEntry(kind="status", at=ch.now, status=int(Status.PAUSED)))
        # Everything that can fail is checked before the first write (no savepoints here).
        if ch.add_events and (full := self._inbox_full(tr, ch)):
            return full
        if (ch.kv_reads or ch.kv_ranges) and (why := tenantkv.conflict(tr, k, t, ch.kv_reads, ch.kv_ranges)):
            return ApplyResult(False, why, kv_conflict=why)
        kv_plan = tenantkv.plan(tr, k, t, ch.kv, ch.now, KVQuota(*ch.kv_quota)) if ch.kv else None
        if isinstance(kv_plan, str):
            return ApplyResult(False, kv_plan, kv_refused=kv_plan)
        released = self._released(tr, ch)
        consumed_now: set[int] = set()
        for seq, _ in ch.consume_events:
            exists = tr.get(k.inst(t, i, "v", seq, 0)) is not None
            taken = tr.get(k.inst(t, i, "vc", seq)) is not None and seq not in released
            if not exists or taken or seq in consumed_now:
                return ApplyResult(False, f"event {seq} was already consumed")
            consumed_now.add(seq)
        if ch.delete_steps_from is not None:
            self._delete_steps(tr, ch)
        for step in ch.steps:
            kp = part(step.key)
            old_seq = tr.get(k.inst(t, i, "sk", kp))
            if old_seq is not None and unpack(old_seq)[0] != step.seq:
                tr.clear(k.inst(t, i, "sq", unpack(old_seq)[0], kp))
            blob = step_json(step)
            put_blob(tr, k.inst(t, i, "s", kp), blob)
            tr.set(k.inst(t, i, "sk", kp), pack((step.seq,)))
            tr.set(k.inst(t, i, "sq", step.seq, kp), encode_int(len(blob)))  # its size: steps_bytes
            if step.event_type:  # a wait's type never changes: its index entry is this one
                waiting = k.inst(t, i, "wt", part(step.event_type), kp)
                if step.status == "waiting":
                    tr.set(waiting, b"")
                else:
                    tr.clear(waiting)
        consumed = tr.get_ranges([(*k.inst_range(t, i, "v", seq), 0) for seq, _ in ch.consume_events])
        for (seq, step_key), rows in zip(ch.consume_events, consumed, strict=True):
            event = loads(join_chunks(rows))
            tr.set(k.inst(t, i, "vc", seq), step_key.encode())
            tr.clear(k.inst(t, i, "w", part(event["type"]), seq))
            tr.set(k.inst(t, i, "c", part(step_key), seq), event["type"].encode())
        event_seqs: list[int] = []
        if ch.add_events:
            raw_last, counted = tr.get(k.inst(t, i, "vn")), tr.get(k.inst(t, i, "vb"))
            last = decode_int(raw_last)
            if not last or counted is not None:  # not an inbox begun before its bytes were counted
                tr.add(k.inst(t, i, "vb"), sum(event.size for event in ch.add_events))
            for event in ch.add_events:
                last += 1
                body = {
                    "type": event.type,
                    "payload_json": event.payload_json,
                    "created_at": event.created_at,
                }
                put_blob(tr, k.inst(t, i, "v", last), dumps(body))
                tr.set(k.inst(t, i, "w", part(event.type), last), encode_int(event.size))
                event_seqs.append(last)
            tr.set(k.inst(t, i, "vn"), encode_int(last))
        final = Status(int(values.get("status", old.status)))
        if (ch.wake_on_events or ch.wake_waiting) and final not in (
            Status.PAUSED, Status.WAITING_FOR_PAUSE, Status.COMPLETE, Status.ERRORED, Status.TERMINATED
        ):  # fmt: skip
            wake = [*ch.wake_on_events, *self._waited_for(tr, ch, ch.wake_waiting)]
            if any(tr.get_ranges([(*k.inst_range(t, i, "w", part(type)), 1) for type in wake])):
                values["run_at"] = ch.now
        new = old.replace(
            status=final,
            run_at=values["run_at"] if "run_at" in values else old.run_at,
            generation=old.generation + 1 if ch.bump_generation else old.generation,
            lease_owner=values["lease_owner"] if "lease_owner" in values else old.lease_owner,
            lease_until=values["lease_until"] if "lease_until" in values else old.lease_until,
            updated_at=ch.now,
        )
        if "code" in values:  # Upgrade re-pins the instance: the envelope's one mutable field
            envelope = loads(join_chunks(tr.get_range(*k.inst_range(t, i, "e"))))
            put_blob(tr, k.inst(t, i, "e"), dumps({**envelope, "code": values["code"]}))
        if any(f in values for f in RESULT):
            rows = tr.get_range(*k.inst_range(t, i, "o"))
            result = loads(join_chunks(rows)) if rows else {}
            result.update({f: values[f] for f in RESULT if f in values})
            put_blob(tr, k.inst(t, i, "o"), dumps(result))
        tr.set(k.inst(t, i, "h"), new.encode())
        if kv_plan is not None:
            tenantkv.apply(tr, k, kv_plan)
        reindex(tr, k, t, i, old, new, lease="lease_owner" in values or "lease_until" in values)
        self._history(tr, t, i, history)
        return ApplyResult(True, event_seqs=event_seqs, status=final)

    def _inbox_full(self, tr: Txn, ch: Change) -> ApplyResult | None:
        """The refusal of ``ch`` if its events would pass its inbox cap (None: they fit). The
        index of unread events holds each one's size (0 for events stored before it did)."""
        max_events, max_bytes = ch.inbox_cap
        if not max_events and not max_bytes:
            return None
        rows = tr.get_range(*self.k.inst_range(ch.tenant, ch.id, "w"), limit=max_events)
        return inbox_refusal(ch, len(rows), sum(decode_int(value) for _, value in rows))

    def _waited_for(self, tr: Txn, ch: Change, types: Sequence[str]) -> list[str]:
        """Those of ``types`` a step of the instance is waiting for (read at once). An instance
        created before waiting steps were indexed (no ``wi`` mark) may wait for any type."""
        k = self.k
        if not types or tr.get(k.inst(ch.tenant, ch.id, "wi")) is None:
            return list(types)
        found = tr.get_ranges([(*k.inst_range(ch.tenant, ch.id, "wt", part(type)), 1) for type in types])
        return [type for type, rows in zip(types, found, strict=True) if rows]

    def _steps_from(self, tr: Txn, ch: Change) -> list[tuple[int, str | bytes]]:
        begin = self.k.inst(ch.tenant, ch.id, "sq", ch.delete_steps_from)
        end = self.k.inst_range(ch.tenant, ch.id, "sq")[1]
        return [tuple(self.k.strip(key)[-2:]) for key, _ in tr.get_range(begin, end)]

    def _released(self, tr: Txn, ch: Change) -> set[int]:
        """Events a restart in ``ch`` gives back (consumed by the journal entries it deletes)."""
        if ch.delete_steps_from is None or not ch.release_events:
            return set()
        seqs: set[int] = set()
        for _, kp in self._steps_from(tr, ch):
            seqs |= {
                self.k.strip(key)[-1]
                for key, _ in tr.get_range(*self.k.inst_range(ch.tenant, ch.id, "c", kp))
            }
        return seqs

    def _delete_steps(self, tr: Txn, ch: Change) -> None:
        k, t, i = self.k, ch.tenant, ch.id
        deleted = self._steps_from(tr, ch)
        for seq, kp in deleted:
            tr.clear_range(*k.inst_range(t, i, "s", kp))
            tr.clear(k.inst(t, i, "sk", kp))
            tr.clear(k.inst(t, i, "sq", seq, kp))
            for key, type in tr.get_range(*k.inst_range(t, i, "c", kp)):
                event_seq = k.strip(key)[-1]
                if not ch.release_events:  # spent: consumed still, by no step of the new journal
                    owner = tr.get(k.inst(t, i, "vc", event_seq)) or b""
                    tr.set(k.inst(t, i, "vc", event_seq), owner + SPENT.encode())
                    continue
                tr.clear(k.inst(t, i, "vc", event_seq))
                event = loads(join_chunks(tr.get_range(*k.inst_range(t, i, "v", event_seq))))
                released = EventRecord(event_seq, event["type"], event["payload_json"], event["created_at"])
                tr.set(k.inst(t, i, "w", part(type.decode()), event_seq), encode_int(released.size))
            tr.clear_range(*k.inst_range(t, i, "c", kp))
        kps = {kp for _, kp in deleted}
        for key, _ in tr.get_range(*k.inst_range(t, i, "wt")):
            if k.strip(key)[-1] in kps:
                tr.clear(key)

    # -- dispatch -------------------------------------------------------------------------------
    def claim(
        self, owner: str, now: float, lease_seconds: float, limit: int, per_tenant: int = 0
    ) -> list[InstanceRecord]:
        if limit <= 0:
            return []
        claim_id = uuid.uuid4().hex  # outside the retry loop: a retry recognises its own leases
        claimed, self._cursor.after = self._idempotent(
            lambda tr: claims.claim(
                tr, self.k, self._load_many, claim_id, owner, now, lease_seconds, limit, per_tenant,
                self._cursor,
            )
        )  # fmt: skip
        return claimed

    def renew_leases(
        self, owner: str, keys: Sequence[tuple[str, str]], until: float
    ) -> list[tuple[str, str]]:
        return self._idempotent(lambda tr: leases.renew(tr, self.k, owner, keys, until))

    def release_leases(self, owner: str) -> int:
        def release(tr: Txn) -> list[Any]:
            rows = tr.get_range(*self.k.glob_range("o", owner), limit=PAGE)
            count = 0
            for key, _ in rows:
                tenant, id = self.k.strip(key)[-2:]
                raw = tr.get(self.k.inst(tenant, id, "h"))
                head = Head.decode(raw) if raw is not None else None
                if head is None or head.lease_owner != owner:
                    tr.clear(key)
                    continue
                new = head.replace(lease_owner=None, lease_until=None)
                tr.set(self.k.inst(tenant, id, "h"), new.encode())
                reindex(tr, self.k, tenant, id, head, new)
                count += 1
            return [count, len(rows) == PAGE]

        total, more = 0, True
        while more:
            count, more = self._once(release)
            total += count
        return total

    def _once(self, fn: Callable[[Txn], T]) -> T:
        """``transact`` for work whose answer a retry could not recompute (what it deleted): the
        answer is kept under ``R "w" id`` in the same transaction, so a retry after a commit that
        applied returns it, and cleared afterwards."""
        marker = self.k.glob("w", uuid.uuid4().hex)

        def once(tr: Txn) -> T:
            kept = tr.get(marker)
            if kept is not None:
                found: T = loads(kept)
                return found
            answer = fn(tr)
            tr.set(marker, dumps(answer))
            return answer

        answer = self._idempotent(once)
        try:
            self._idempotent(lambda tr: tr.clear(marker))
        except Unavailable:  # the work is done and its answer known: only a few bytes stay behind
            log.warning("storage: could not clear the answer marker %r; it stays (harmless)", marker)
        return answer

    def delete_instance(self, tenant: str, id: str) -> bool:
        return self._once(lambda tr: delete(tr, self.k, tenant, id))

    def purge_ended(self, before: float, limit: int) -> int:
        begin = self.k.glob_range("e")[0]
        end = self.k.glob("e", before)

        def purge(tr: Txn, page: int) -> list[Any]:
            rows = tr.get_range(begin, end, limit=page)
            count = 0
            for key, _ in rows:
                _, _, tenant, id = self.k.strip(key)
                count += delete(tr, self.k, tenant, id)
                tr.clear(key)
            return [count, len(rows) == page]

        total, more = 0, True
        while more and total < limit:
            page = min(PAGE, limit - total)
            count, more = self._once(lambda tr, p=page: purge(tr, p))  # type: ignore[misc]
            total += count
        return total

    def list_tenants(
        self, prefix: str, cursor: str | None, limit: int, keep: Callable[[str], bool] | None = None
    ) -> tuple[list[TenantSummary], str | None]:
        """A read of one key per tenant looked at (at most 200 a call); per tenant listed, one read
        transaction of seven keys: instances and versions are counted by per-tenant counters, never
        scanned (plugins/storage_fdb/tenants.py)."""
        return list_tenant_page(self.layer, self.k, prefix, cursor, limit, keep)

    def next_run_at(self) -> float | None:
        return self.layer.read(lambda tr: claims.next_run_at(tr, self.k, self._cursor))

    def count_by_status(self) -> dict[Status, int]:
        counts: Counter[Status] = Counter()
        for key, value in self.layer.read(lambda tr: tr.get_range(*self.k.glob_range("n"))):
            counts[Status(self.k.strip(key)[1])] += decode_int(value)
        return dict(counts)

    # -- schedules (plugins/storage_fdb/schedules.py) ------------------------------------------------
    def create_schedule(self, schedule: ScheduleRecord, max_per_tenant: int = 0) -> ScheduleRecord:
        return self._idempotent(lambda tr: schedules.create(tr, self.k, schedule, max_per_tenant))

    def get_schedule(self, tenant: str, name: str) -> ScheduleRecord | None:
        return self.layer.read(lambda tr: schedules.get(tr, self.k, tenant, name))

    def list_schedules(
        self, tenant: str, cursor: str | None, limit: int
    ) -> tuple[list[ScheduleRecord], str | None]:
        return self.layer.read(lambda tr: schedules.list_page(tr, self.k, tenant, cursor, limit))

    def update_schedule(self, schedule: ScheduleRecord) -> ScheduleRecord | None:
        return self._idempotent(lambda tr: schedules.update(tr, self.k, schedule))

    def delete_schedule(self, tenant: str, name: str) -> bool:
        return self._once(lambda tr: schedules.delete(tr, self.k, tenant, name))

    def claim_schedules(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        per_tenant: int = 0,
        skip: Collection[str] = (),
    ) -> list[ScheduleRecord]:
        return self._idempotent(
            lambda tr: schedules.claim(tr, self.k, owner, now, lease_seconds, limit, per_tenant, skip)
        )

    # -- a tenant's key-value store and secrets (plugins/storage_fdb/tenantkv.py) ----------------
    def kv_get(self, tenant: str, key: str) -> KVEntry | None:
        return self.layer.read(lambda tr: tenantkv.get(tr, self.k, tenant, key))

    def kv_list(
        self, tenant: str, prefix: str, after: str | None, limit: int
    ) -> tuple[list[KVEntry], str | None]:
        return self.layer.read(lambda tr: tenantkv.page(tr, self.k, tenant, prefix, after, limit))

    def kv_usage(self, tenant: str) -> KVUsage:
        return self.layer.read(lambda tr: tenantkv.usage(tr, self.k, tenant))

    def kv_write(
        self, tenant: str, writes: Sequence[KVWrite], now: float, quota: KVQuota = NO_QUOTA
    ) -> list[bool]:
        def write(tr: Txn) -> list[bool]:
            plan = tenantkv.plan(tr, self.k, tenant, writes, now, quota)
            if isinstance(plan, str):
                raise ResourceExhausted(plan)
            tenantkv.apply(tr, self.k, plan)
            return plan.existed

        return self._once(write)  # a retry after a commit that applied would see every key existing

    def put_secret(self, tenant: str, name: str, sealed: bytes, now: float) -> None:
        self._idempotent(lambda tr: tenantkv.put_secret(tr, self.k, tenant, name, sealed, now))

    def get_secret(self, tenant: str, name: str) -> tuple[bytes, float] | None:
        raw = self.layer.read(lambda tr: tr.get(self.k.glob("S", tenant, name)))
        return tenantkv.loads_secret(raw) if raw is not None else None

    def delete_secret(self, tenant: str, name: str) -> bool:
        def delete(tr: Txn) -> bool:
            key = self.k.glob("S", tenant, name)
            if tr.get(key) is None:
                return False
            tr.clear(key)
            return True

        return self._once(delete)

    def list_secrets(
        self, tenant: str | None, after: tuple[str, str] | None = None, limit: int = 1000
    ) -> list[tuple[str, str, bytes, float]]:
        return self.layer.read(lambda tr: tenantkv.list_secrets(tr, self.k, tenant, after, limit))

    # ``R "E" tenant``: a tenant's egress allow-list (its rules as JSON, and when they were set)
    def put_egress(self, tenant: str, rules_json: str, now: float) -> None:
        self._idempotent(lambda tr: tr.set(self.k.glob("E", tenant), pack((rules_json, now))))

    def get_egress(self, tenant: str) -> tuple[str, float] | None:
        raw = self.layer.read(lambda tr: tr.get(self.k.glob("E", tenant)))
        if raw is None:
            return None
        rules_json, at = unpack(raw)
        return str(rules_json), float(at)

    def close(self) -> None:
        self.layer.close()
