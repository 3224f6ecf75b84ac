"""Session state in Redis, shared by every router replica.

Keys of one session (the {id} hash tag keeps them in one cluster slot):
  <prefix>{<id>}:meta          hash: status, options, mode, models, turn, affinity, len, ...
  <prefix>{<id>}:log           list: one JSON record per prompt/turn/step/join/answer
  <prefix>{<id>}:prefix:<view> string: the view's token ids, int32 little-endian, appended
  <prefix>{<id>}:lease         string: "<holder>|<random>" of the router working on it
and one index of live sessions, <prefix>sessions (sorted set: id -> expiry ms), for
the session-count limit.

Every write is a Lua script that first checks the caller's lease token, the
cancel flag and the log length it expects (`len` in the meta hash), then appends
the records, their tokens and the meta fields: a step is stored whole or not at
all, by the lease holder only, and never twice (a retried write finds the log
already longer). A step's write is 5 commands (6 in text mode): GET lease, HMGET
cancel/len, RPUSH, APPEND per view, HSET.

TTLs are not refreshed per step. A turn's first write sets them to session_ttl +
2 x lease_ms from now, and a lease renewal sets them so again once they have
less than session_ttl + lease_ms left (so at least every lease_ms + renewal
period, and most renewals leave them alone); the turn's last write (or the
status a stopped request leaves) sets them to session_ttl from now. So a
session is never dropped while a router works on it (it renews while it holds
the lease, and can only write while it holds it), and expires at least
session_ttl after its last write, at most about session_ttl + 2 x lease_ms.

Script calls of concurrent sessions are sent together (`_Batch`): while one
pipeline is in flight the next piles up, so under load one round trip carries
many sessions' step writes and lease renewals, which is what keeps the router's
CPU per step flat as sessions are added.
"""
from __future__ import annotations

import array
import asyncio
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.router import metrics, spans
from services.router.errors import FailedPrecondition, LeaseLost, LimitExceeded, SessionBusy, SessionCancelled
from services.router.session import Record, SessionMeta

# KEYS: meta, lease, index, log, prefix views...
# ARGV: token, expected log length, now ms, ttl ms (0: leave), release (0/1), session id,
#       n records, records..., n views, (tokens)..., meta field/value pairs...
_APPEND = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local m = redis.call('HMGET', KEYS[1], 'cancel', 'len')
if m[1] == '1' then return -3 end
local n = tonumber(m[2]) or 0
if n ~= tonumber(ARGV[2]) then return -2 end
local i = 7
local nrec = tonumber(ARGV[i])
if nrec > 0 then redis.call('RPUSH', KEYS[4], unpack(ARGV, i + 1, i + nrec)) end
i = i + nrec + 1
local nviews = tonumber(ARGV[i])
for v = 1, nviews do redis.call('APPEND', KEYS[4 + v], ARGV[i + v]) end
i = i + nviews + 1
redis.call('HSET', KEYS[1], 'len', n + nrec, 'updated_ms', ARGV[3], unpack(ARGV, i))
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  for k = 4, #KEYS do redis.call('PEXPIRE', KEYS[k], ttl) end
  redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) + ttl, ARGV[6])
end
if ARGV[5] == '1' then redis.call('DEL', KEYS[2]) end
return n + nrec
"""

# KEYS: meta, lease, index, log, prefix views...   ARGV: token, lease ms, ttl ms, now ms,
# session id, max sessions, record, n views, tokens..., meta pairs...
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -4 end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
if tonumber(ARGV[6]) > 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then return -5 end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('RPUSH', KEYS[4], ARGV[7])
local nviews = tonumber(ARGV[8])
for v = 1, nviews do redis.call('SET', KEYS[4 + v], ARGV[8 + v], 'PX', ttl) end
redis.call('HSET', KEYS[1], 'created_ms', ARGV[4], 'updated_ms', ARGV[4], 'len', 1, unpack(ARGV, 9 + nviews))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + ttl, ARGV[5])
return 1
"""

# KEYS: lease, meta, index, log, prefix views...   ARGV: token, lease ms, keep ms, refresh below ms, now ms,
# session id -> 1 renewed, 0 lost, 2 cancel requested. The session's keys are kept for `keep` again
# once they have less than `refresh below` left (so most renewals leave them alone).
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
if redis.call('HGET', KEYS[2], 'cancel') == '1' then return 2 end
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then
  local keep = tonumber(ARGV[3])
  redis.call('PEXPIRE', KEYS[2], keep)
  for k = 4, #KEYS do redis.call('PEXPIRE', KEYS[k], keep) end
  redis.call('ZADD', KEYS[3], tonumber(ARGV[5]) + keep, ARGV[6])
end
return 1
"""

# KEYS: meta, lease, index, log, prefix views...   ARGV: token, status, error, now ms, ttl ms, session id,
# release (0/1). Under the lease (also after a cancel request, unlike append).
_STATUS = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'error', ARGV[3], 'updated_ms', ARGV[4])
local ttl = tonumber(ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
for k = 4, #KEYS do redis.call('PEXPIRE', KEYS[k], ttl) end
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + ttl, ARGV[6])
if ARGV[7] == '1' then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: lease   ARGV: token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: meta, lease -> 0 unknown, 1 flagged (working or not), 2 already finished
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'done' or status == 'cancelled' then return 2 end
redis.call('HSET', KEYS[1], 'cancel', '1')
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('HSET', KEYS[1], 'status', 'cancelled') end
return 1
"""

# KEYS: meta   ARGV: trace id, how many to keep -> 1 noted, 0 no such session.
# The trace ids of the requests that worked on the session, oldest first, space
# separated: `glimprouter session show` prints them for opening in Jaeger.
_TRACE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ids = {}
for id in string.gmatch(redis.call('HGET', KEYS[1], 'trace_ids') or '', '%S+') do
  if id ~= ARGV[1] then table.insert(ids, id) end
end
table.insert(ids, ARGV[1])
local keep = tonumber(ARGV[2])
while #ids > keep do table.remove(ids, 1) end
redis.call('HSET', KEYS[1], 'trace_id', ARGV[1], 'trace_ids', table.concat(ids, ' '))
return 1
"""
MAX_TRACE_IDS = 32

_LITTLE = sys.byteorder == "little"
ALL_VIEWS = ("shared", "small", "large")


def pack_ids(ids: list[int]) -> bytes:
    a = array.array("i", ids)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


def unpack_ids(data: bytes | None) -> list[int]:
    a = array.array("i")
    if data:
        a.frombytes(data)
        if not _LITTLE:
            a.byteswap()
    return a.tolist()


@dataclass
class StoredSession:
    session_id: str
    meta: SessionMeta
    records: list[Record]
    prefixes: dict[str, list[int]] = field(default_factory=dict)
    lease_holder: str = ""
    lease_ms_left: int = 0


class _Script:
    def __init__(self, name: str, source: str) -> None:
        import hashlib

        self.name, self.source = name, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Batch:
    """Script calls from every session, sent together: one pipeline at a time is in
    flight, and the calls made while it is carry the next one. At low load a call
    goes out at once; under load a round trip carries many steps' writes, so the
    CPU per write falls as sessions are added. Each caller gets its own result (or
    error); a NOSCRIPT (Redis restarted, scripts flushed) loads the script and
    sends that call again."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self.pending: list[tuple[_Script, list, list, asyncio.Future]] = []
        self.sender: asyncio.Task | None = None
        # One round trip is in flight at a time, so it keeps one connection of the pool
        # for itself: taking one from redis-py's blocking pool and giving it back (a
        # condition, a lock, a timeout and connection-count records each way) cost about
        # as much as the round trip's own work.
        self.conn = None

    async def call(self, script: _Script, keys: list, args: list):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((script, keys, args, fut))
        if self.sender is None or self.sender.done():
            # Untraced: each caller has its own span (below); a task of its own, so a caller
            # that is cancelled does not cancel the others' writes.
            self.sender = asyncio.get_running_loop().create_task(self._send_all(), context=spans.untraced_context())
        with spans.redis_script(script.name):
            return await fut

    async def _send_all(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            await self._send(batch)

    async def _send(self, batch) -> None:
        try:
            results = await self._execute(batch)
        except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, fut), res in zip(batch, results):
            if not fut.done():
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def _execute(self, batch) -> list:
        results = await self._round_trip([("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args, _ in batch])
        missing = {script.sha: script for (script, *_), res in zip(batch, results) if isinstance(res, NoScriptError)}
        if missing:
            await self._round_trip([("SCRIPT", "LOAD", script.source) for script in missing.values()])
            again = iter(await self._round_trip([("EVALSHA", script.sha, len(keys), *keys, *args)
                                                 for script, keys, args, _ in batch if script.sha in missing]))
            results = [next(again) if script.sha in missing else res for (script, *_), res in zip(batch, results)]
        return results

    async def _round_trip(self, commands: list[tuple]) -> list:
        """Commands in one write, their replies in order (an error reply as its exception).
        Packed by hiredis (C) and read under one timeout for the whole batch: redis-py's
        pipeline packs in Python and arms a timer per reply, which cost more than the
        scripts' own work."""
        conn = self.conn
        if conn is None:
            conn = self.conn = await self.r.connection_pool.get_connection()
        try:
            timeout = conn.socket_timeout
            async with asyncio.timeout(timeout):
                await conn.send_packed_command([hiredis.pack_command(c) for c in commands], check_health=False)
                out = []
                for _ in commands:
                    try:
                        out.append(await conn.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        out.append(exc)
            metrics.redis_round_trip(len(commands))
            return out
        except TimeoutError:  # asyncio's: Redis hangs (the same error redis-py's own timeouts give)
            await self._drop(conn)
            raise RedisTimeoutError(f"Redis did not answer within {conn.socket_timeout}s") from None
        except BaseException:
            await self._drop(conn)  # a half-read connection is not used again
            raise

    async def _drop(self, conn) -> None:
        """The connection back to the pool, disconnected (the next round trip takes another)."""
        if self.conn is conn:
            self.conn = None
        await conn.disconnect(nowait=True)
        await self.r.connection_pool.release(conn)

    async def close(self) -> None:
        sender = self.sender
        if sender is not None and not sender.done():
            sender.cancel()  # a round trip under way gives its connection back as it stops
            await asyncio.gather(sender, return_exceptions=True)
        if self.conn is not None:
            await self._drop(self.conn)


class SessionStore:
    def __init__(self, client: aioredis.Redis, key_prefix: str, ttl_s: int, lease_ms: int, max_sessions: int) -> None:
        self.r = client
        self.prefix = key_prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.lease_ms = lease_ms
        self.keep_ms = self.ttl_ms + 2 * lease_ms  # how long a session being worked on is kept (see above)
        self.max_sessions = max_sessions
        self._batch = _Batch(client)
        self.scripts = {name: _Script(name, src) for name, src in (
            ("append", _APPEND), ("create", _CREATE), ("renew", _RENEW), ("set_status", _STATUS),
            ("release", _RELEASE), ("cancel", _CANCEL), ("add_trace", _TRACE),
        )}

    @classmethod
    def from_url(
        cls, url: str, key_prefix: str, ttl_s: int, lease_ms: int, max_sessions: int, max_connections: int = 64,
        timeout_s: float = 5.0, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
    ) -> "SessionStore":
        # rediss:// turns TLS on; user:password@ in the URL does AUTH. A blocking pool:
        # many sessions writing at once wait briefly for a connection instead of failing
        # with "Too many connections". Socket timeouts: a Redis that hangs (not just
        # refuses) fails requests within timeout_s instead of holding them forever;
        # socket_timeout=... in the URL's query wins.
        tls: dict = {}
        if url.startswith("rediss://"):
            # A private CA (and a client certificate, for a Redis that asks for one);
            # without a CA the system roots verify the server.
            tls = {k: v for k, v in (("ssl_ca_certs", tls_ca), ("ssl_certfile", tls_cert), ("ssl_keyfile", tls_key)) if v}
        elif tls_ca or tls_cert or tls_key:
            raise ValueError("--redis-tls-* settings need a rediss:// URL")
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=30,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **tls,
        )
        return cls(aioredis.Redis(connection_pool=pool), key_prefix, ttl_s, lease_ms, max_sessions)

    async def close(self) -> None:
        await self._batch.close()
        await self.r.aclose()

    async def _run(self, name: str, keys: list, args: list):
        return await self._batch.call(self.scripts[name], keys, args)

    # ---- keys ------------------------------------------------------------------------
    def key(self, session_id: str, part: str) -> str:
        return f"{self.prefix}{{{session_id}}}:{part}"

    def _keys(self, session_id: str, views) -> list[str]:
        """meta, lease, index, log, then the prefix views: the order every script expects."""
        k = f"{self.prefix}{{{session_id}}}:"
        return [k + "meta", k + "lease", self.prefix + "sessions", k + "log"] + [f"{k}prefix:{v}" for v in views]

    @staticmethod
    def new_lease_token(holder: str) -> str:
        return f"{holder}|{uuid.uuid4().hex}"

    # ---- writes ----------------------------------------------------------------------
    async def create(self, session_id: str, token: str, record: Record, tokens: dict[str, list[int]],
                     meta: SessionMeta) -> None:
        """A new session with its first record, under a lease this caller holds."""
        views = sorted(tokens)
        record.prefix_end = {v: len(tokens[v]) for v in views}
        meta.views, meta.log_len = tuple(views), 1
        args: list = [token, self.lease_ms, self.keep_ms, _now_ms(), session_id, self.max_sessions,
                      record.to_json(), len(views)]
        args += [pack_ids(tokens[v]) for v in views]
        args += _pairs(meta.to_hash())
        rc = await self._run("create", self._keys(session_id, views), args)
        if rc == -4:
            raise FailedPrecondition(f"session {session_id!r} already exists")
        if rc == -5:
            raise LimitExceeded(f"too many live sessions (limit {self.max_sessions}, --max-sessions); retry later")

    async def append(
        self,
        session_id: str,
        token: str,
        expected_len: int,
        entries: list[tuple[Record, dict[str, list[int]]]],
        fields: dict[str, str],
        *,
        views: tuple[str, ...] = (),
        turn_start: bool = False,
        turn_end: bool = False,
    ) -> int:
        """Append records (and their tokens) at log position `expected_len`, under the lease.
        `turn_start`: also keep the session for session_ttl + lease_ms; `turn_end`: the
        turn's last write: keep it for session_ttl from now and release the lease
        (`views`: every view the session has, whose keys the TTL covers)."""
        merged: dict[str, list[int]] = {}
        for _, tokens in entries:
            for view, ids in tokens.items():
                merged.setdefault(view, []).extend(ids)
        written = sorted(merged)
        ttl = self.ttl_ms if turn_end else self.keep_ms if turn_start else 0
        keys = self._keys(session_id, written + [v for v in views if v not in merged] if ttl else written)
        args: list = [token, expected_len, _now_ms(), ttl, "1" if turn_end else "0", session_id, len(entries)]
        args += [r.to_json() for r, _ in entries]
        args += [len(written)] + [pack_ids(merged[v]) for v in written]
        args += _pairs(fields)
        rc = await self._run("append", keys, args)
        if rc == -1:
            raise LeaseLost(f"session {session_id!r}: this router's lease expired or was taken over; its step was not stored")
        if rc == -2:
            raise LeaseLost(f"session {session_id!r}: the stored log moved on (expected {expected_len} records)")
        if rc == -3:
            raise SessionCancelled(f"session {session_id!r} was cancelled")
        return int(rc)

    async def set_status(self, session_id: str, token: str, status: str, error: str, *, views: tuple[str, ...] = ALL_VIEWS,
                         release: bool = False, keep_ms: int | None = None) -> bool:
        """Set the status under the lease (also after a cancel request, unlike append); the
        session is then kept for session_ttl from now (`keep_ms`: another span, e.g. a turn
        starting); `release` gives the lease up in the same call."""
        ttl = self.ttl_ms if keep_ms is None else keep_ms
        args = [token, status, error, _now_ms(), ttl, session_id, "1" if release else "0"]
        return bool(await self._run("set_status", self._keys(session_id, views), args))

    # ---- the lease -----------------------------------------------------------------------
    async def acquire(self, session_id: str, token: str) -> None:
        lease = self.key(session_id, "lease")
        if await self.r.set(lease, token, nx=True, px=self.lease_ms):
            return
        async with self.r.pipeline(transaction=False) as p:
            p.get(lease)
            p.pttl(lease)
            holder, left = await p.execute()
        if holder is None:  # expired between the two calls
            if await self.r.set(lease, token, nx=True, px=self.lease_ms):
                return
        who = holder.decode().split("|")[0] if holder else "another router"
        raise SessionBusy(
            f"session {session_id!r} is being worked on by router {who} (its lease expires in {max(0, left)} ms "
            "unless renewed); wait for that request to finish, or retry after the lease expires"
        )

    async def renew(self, session_id: str, token: str, views: tuple[str, ...] = ALL_VIEWS) -> int:
        """1 renewed (and the session's keys kept for session_ttl + lease_ms), 0 lost, 2 cancel requested."""
        k = self._keys(session_id, views)
        keys = [k[1], k[0], *k[2:]]
        args = [token, self.lease_ms, self.keep_ms, self.ttl_ms + self.lease_ms, _now_ms(), session_id]
        return int(await self._run("renew", keys, args))

    async def release(self, session_id: str, token: str) -> None:
        await self._run("release", [self.key(session_id, "lease")], [token])

    async def owner(self, session_id: str) -> str | None:
        """The owner id stored with the session ("" for none); None when there is no such session."""
        owner, created = await self.r.hmget(self.key(session_id, "meta"), ["owner", "created_ms"])
        if created is None:
            return None
        return owner.decode() if owner is not None else ""

    async def request_cancel(self, session_id: str) -> int:
        return int(await self._run("cancel", [self.key(session_id, "meta"), self.key(session_id, "lease")], []))

    async def add_trace(self, session_id: str, trace_id: str) -> bool:
        """Note the trace of the request working on the session (its meta's trace_id and trace_ids)."""
        return bool(await self._run("add_trace", [self.key(session_id, "meta")], [trace_id, MAX_TRACE_IDS]))

    # ---- reads -----------------------------------------------------------------------------
    async def load(self, session_id: str, with_prefixes: bool = True) -> StoredSession | None:
        # One MULTI, so the log and the prefixes are read at the same instant; the
        # prefix keys of both modes are read (a missing key costs nothing).
        views = list(ALL_VIEWS) if with_prefixes else []
        async with self.r.pipeline(transaction=True) as p:
            p.hgetall(self.key(session_id, "meta"))
            p.lrange(self.key(session_id, "log"), 0, -1)
            p.get(self.key(session_id, "lease"))
            p.pttl(self.key(session_id, "lease"))
            for v in views:
                p.get(self.key(session_id, f"prefix:{v}"))
            raw_meta, raw_log, lease, left, *blobs = await p.execute()
        if not raw_meta:
            return None
        meta = SessionMeta.from_hash({k.decode(): v.decode() for k, v in raw_meta.items()})
        s = StoredSession(session_id, meta, [Record.from_json(x) for x in raw_log])
        if lease:
            s.lease_holder, s.lease_ms_left = lease.decode().split("|")[0], max(0, int(left))
        s.prefixes = {v: unpack_ids(b) for v, b in zip(views, blobs) if v in meta.views}
        return s


def _pairs(fields: dict[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in fields.items():
        out += [k, v]
    return out


def redact_url(url: str) -> str:
    """The Redis URL as it may be logged: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def default_holder() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


__all__ = ["SessionStore", "StoredSession", "pack_ids", "unpack_ids", "ResponseError", "default_holder"]
