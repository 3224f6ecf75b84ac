"""Session state in Redis, shared by every router replica.

Keys of one session (the {id} hash tag keeps them in one cluster slot):
  <prefix>{<id>}:meta          hash: status, options, mode, models, turn, affinity, ...
  <prefix>{<id>}:log           list: one JSON record per prompt/turn/step/join/answer
  <prefix>{<id>}:prefix:<view> string: the view's token ids, int32 little-endian, appended
  <prefix>{<id>}:lease         string: "<holder>|<random>" of the router working on it
and one index of live sessions, <prefix>sessions (sorted set: id -> expiry ms), for
the session-count limit.

Every write goes through a Lua script that first checks the caller's lease token
and the log length it expects, then appends the records, their tokens and the meta
fields and refreshes the TTLs: a step is stored whole or not at all, by the lease
holder only, and never twice (a retried write finds the log already longer).
"""
from __future__ import annotations

import array
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.router.types import FailedPrecondition, LeaseLost, LimitExceeded, Record, RouterError, SessionBusy, SessionCancelled

# KEYS: meta, log, lease, index, prefix views...
# ARGV: token, expected log length, ttl ms, now ms, session id, n records, records...,
#       n views, (tokens)..., meta field/value pairs...
_APPEND = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return -3 end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return -2 end
local ttl = tonumber(ARGV[3])
local i = 6
local nrec = tonumber(ARGV[i])
for r = 1, nrec do redis.call('RPUSH', KEYS[2], ARGV[i + r]) end
i = i + nrec + 1
local nviews = tonumber(ARGV[i])
for v = 1, nviews do
  redis.call('APPEND', KEYS[4 + v], ARGV[i + v])
  redis.call('PEXPIRE', KEYS[4 + v], ttl)
end
i = i + nviews + 1
if i <= #ARGV then redis.call('HSET', KEYS[1], unpack(ARGV, i)) end
redis.call('HSET', KEYS[1], 'updated_ms', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[4], tonumber(ARGV[4]) + ttl, ARGV[5])
return redis.call('LLEN', KEYS[2])
"""

# KEYS: meta, log, lease, index, prefix views...   ARGV: token, lease ms, ttl ms, now ms,
# session id, max sessions, record, n views, tokens..., meta pairs...
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -4 end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[4])
if tonumber(ARGV[6]) > 0 and redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[6]) then return -5 end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[3], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('RPUSH', KEYS[2], ARGV[7])
local nviews = tonumber(ARGV[8])
for v = 1, nviews do
  redis.call('SET', KEYS[4 + v], ARGV[8 + v], 'PX', ttl)
end
local i = 9 + nviews
redis.call('HSET', KEYS[1], 'created_ms', ARGV[4], 'updated_ms', ARGV[4], unpack(ARGV, i))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[4], tonumber(ARGV[4]) + ttl, ARGV[5])
return 1
"""

# KEYS: lease, meta   ARGV: token, lease ms  -> 1 renewed, 0 lost, 2 cancel requested
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
if redis.call('HGET', KEYS[2], 'cancel') == '1' then return 2 end
return 1
"""

# KEYS: meta, lease   ARGV: token, status, error, now ms
_STATUS = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'error', ARGV[3], 'updated_ms', ARGV[4])
return 1
"""

# KEYS: lease   ARGV: token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: meta, lease  ARGV: ttl ms -> 0 unknown, 1 flagged (working or not), 2 already finished
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
    meta: dict[str, str]
    records: list[Record]
    prefixes: dict[str, list[int]] = field(default_factory=dict)
    lease_holder: str = ""
    lease_ms_left: int = 0


class SessionStore:
    def __init__(self, client: aioredis.Redis, key_prefix: str, ttl_s: int, lease_ms: int, max_sessions: int) -> None:
        self.r = client
        self.prefix = key_prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.lease_ms = lease_ms
        self.max_sessions = max_sessions
        self._append = client.register_script(_APPEND)
        self._create = client.register_script(_CREATE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._cancel = client.register_script(_CANCEL)
        self._status = client.register_script(_STATUS)
        self._trace = client.register_script(_TRACE)

    @classmethod
    def from_url(
        cls, url: str, key_prefix: str, ttl_s: int, lease_ms: int, max_sessions: int, max_connections: int = 64,
        timeout_s: float = 5.0, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
    ) -> "SessionStore":
        # rediss:// turns TLS on; user:password@ in the URL does AUTH. A blocking pool:
        # hundreds of sessions writing at once wait briefly for a connection instead of
        # failing with "Too many connections". Socket timeouts: a Redis that hangs (not
        # just refuses) fails requests within timeout_s instead of holding them forever;
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
        await self.r.aclose()

    # ---- keys ------------------------------------------------------------------------
    def key(self, session_id: str, part: str) -> str:
        return f"{self.prefix}{{{session_id}}}:{part}"

    def _keys(self, session_id: str, views: list[str]) -> list[str]:
        return [
            self.key(session_id, "meta"),
            self.key(session_id, "log"),
            self.key(session_id, "lease"),
            self.prefix + "sessions",
        ] + [self.key(session_id, f"prefix:{v}") for v in views]

    @staticmethod
    def new_lease_token(holder: str) -> str:
        return f"{holder}|{uuid.uuid4().hex}"

    # ---- writes ----------------------------------------------------------------------
    async def create(
        self,
        session_id: str,
        token: str,
        record: Record,
        tokens: dict[str, list[int]],
        meta: dict[str, str],
    ) -> None:
        views = sorted(tokens)
        record.prefix_end = {v: len(tokens[v]) for v in views}
        args: list = [token, self.lease_ms, self.ttl_ms, _now_ms(), session_id, self.max_sessions, record.to_json(), len(views)]
        args += [pack_ids(tokens[v]) for v in views]
        args += _pairs(meta)
        rc = await self._create(keys=self._keys(session_id, views), args=args)
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
        meta: dict[str, str],
    ) -> int:
        merged: dict[str, list[int]] = {}
        for _, tokens in entries:
            for view, ids in tokens.items():
                merged.setdefault(view, []).extend(ids)
        views = sorted(merged)
        args: list = [token, expected_len, self.ttl_ms, _now_ms(), session_id, len(entries)]
        args += [r.to_json() for r, _ in entries]
        args += [len(views)] + [pack_ids(merged[v]) for v in views]
        args += _pairs(meta)
        rc = await self._append(keys=self._keys(session_id, views), args=args)
        if rc == -1:
            raise LeaseLost(
                f"session {session_id!r}: this router's lease expired or was taken over; its step was not stored"
            )
        if rc == -2:
            raise LeaseLost(f"session {session_id!r}: the stored log moved on (expected {expected_len} records)")
        if rc == -3:
            raise SessionCancelled(f"session {session_id!r} was cancelled")
        return int(rc)

    async def set_status(self, session_id: str, token: str, status: str, error: str) -> bool:
        """Set the status under the lease (also after a cancel request, unlike append)."""
        keys = [self.key(session_id, "meta"), self.key(session_id, "lease")]
        return bool(await self._status(keys=keys, args=[token, status, error, _now_ms()]))

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

    async def renew(self, session_id: str, token: str) -> int:
        return int(await self._renew(keys=[self.key(session_id, "lease"), self.key(session_id, "meta")], args=[token, self.lease_ms]))

    async def release(self, session_id: str, token: str) -> None:
        await self._release(keys=[self.key(session_id, "lease")], args=[token])

    async def owner(self, session_id: str) -> str | None:
        """The owner id stored with the session ("" for none); None when there is no such session."""
        owner, created = await self.r.hmget(self.key(session_id, "meta"), ["owner", "created_ms"])
        if created is None:
            return None
        return owner.decode() if owner is not None else ""

    async def request_cancel(self, session_id: str) -> int:
        return int(await self._cancel(keys=[self.key(session_id, "meta"), self.key(session_id, "lease")], args=[self.ttl_ms]))

    async def add_trace(self, session_id: str, trace_id: str) -> bool:
        """Note the trace of the request working on the session (its meta's trace_id and trace_ids)."""
        return bool(await self._trace(keys=[self.key(session_id, "meta")], args=[trace_id, MAX_TRACE_IDS]))

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
        meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
        s = StoredSession(session_id, meta, [Record.from_json(x) for x in raw_log])
        if lease:
            s.lease_holder, s.lease_ms_left = lease.decode().split("|")[0], max(0, int(left))
        stored_views = [v for v in meta.get("views", "").split(",") if v]
        s.prefixes = {v: unpack_ids(b) for v, b in zip(views, blobs) if v in stored_views}
        return s


def _pairs(meta: dict[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in meta.items():
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


__all__ = ["SessionStore", "StoredSession", "pack_ids", "unpack_ids", "RouterError", "ResponseError", "default_holder"]
