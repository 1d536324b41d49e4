"""Working memory: a tiered store of prompt KV in fixed-size chunks, shared across requests, processes and
machines (issue 15).

    store = PrefixStore.from_specs(["host:4GiB", "disk:/var/cache/looplm-kv:20GiB", "redis://127.0.0.1:6379"])
    engine = looplm.Engine(model, kv="last", kv_store=store)

A chunk is `chunk_size` consecutive prompt positions (256 by default). Its key chains the parent chunk's
key with the chunk's token ids, from a root that holds everything the stored KV depends on (the weights'
fingerprint, the model's shape, dtype, the KV dtype, the loops stored, the chunk size, and — for models
with coda layers — the exit policy, since the coda's KV is read at each position's exit): equal keys ⇒
equal prefix tokens under the same model and budget, so a hit is the KV a cold prefill computes.

What a chunk holds is every loop's KV ("loops" semantics, see docs/memory.md): prelude and coda layers one
slot each, core layers one slot per loop, (slots, Hkv, chunk, Dh) for K and V. That is what a single-pass
prefill has before it commits, so a warm request is token for token a cold one, under every KV strategy
(the strategy is not in the key: per_loop, last, mean and first all commit from it).

Tiers are tried in the order given; a hit is promoted into the tiers before it. Each has a byte budget
and evicts least recently used entries. Writes go to the first tier at once (host RAM: a dict insert)
and to the others on a background thread, so a request never waits on a slow tier. Disk and Redis values
carry a checksum header, verified on every read: a corrupt, truncated or vanished entry is a miss, never
served. Redis going down is logged once and costs misses until it is back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger("looplm.store")

CHUNK_SIZE = 256
_MAGIC = b"LOOPKV1\n"
_HEADER = struct.Struct(">8s32sQ")  # magic, sha256 of the payload, payload length
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}

Chunk = dict[str, torch.Tensor]


def parse_bytes(text: str) -> int:
    """'4GiB' → 4294967296, '500MB' → 500000000, '1024' → 1024."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (e.g. 512MiB, 4GiB, 20GB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 1:
        raise ValueError(f"a byte budget must be ≥ 1 byte, got {text!r}")
    return n


# ---------------------------------------------------------------------- keys and values


def chunk_keys(root: str, tokens: Sequence[int], chunk_size: int) -> list[str]:
    """Keys of the full chunks of `tokens`: key_i = H(key_{i-1}, tokens of chunk i), key_{-1} = root."""
    keys, parent = [], root
    for a in range(0, len(tokens) - chunk_size + 1, chunk_size):
        h = hashlib.sha256(parent.encode())
        h.update(struct.pack(f"<{chunk_size}q", *tokens[a : a + chunk_size]))
        parent = h.hexdigest()[:40]
        keys.append(parent)
    return keys


# config fields that do not change what a forward computes for a given loop count (defaults of a run)
_RUN_DEFAULTS = ("num_loops", "eos_token_id", "bos_token_id", "pad_token_id")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer's name, dtype, shape and bytes, and of the model's config (the
    structure: prelude / core / coda, norms, injection…; not run defaults such as num_loops). Cached on the
    model until a tensor changes (torch counts in-place writes in `_version`)."""
    state = model.state_dict()
    versions = tuple((name, t.data_ptr(), t._version) for name, t in sorted(state.items()))
    cached = getattr(model, "_looplm_fingerprint", None)
    if cached is not None and cached[0] == versions:
        return cached[1]
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(repr(sorted((k, v) for k, v in config.to_dict().items() if k not in _RUN_DEFAULTS)).encode())
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    model._looplm_fingerprint = (versions, h.hexdigest())
    return model._looplm_fingerprint[1]


def encode(chunk: Chunk) -> bytes:
    """A chunk as bytes: header (magic, sha256, length) + safetensors payload."""
    payload = st_save({k: v.contiguous() for k, v in chunk.items()})
    return _HEADER.pack(_MAGIC, hashlib.sha256(payload).digest(), len(payload)) + payload


def decode(blob: bytes | None) -> Chunk | None:
    """The chunk, or None when the bytes are not a whole, uncorrupted chunk."""
    if blob is None or len(blob) < _HEADER.size:
        return None
    magic, digest, n = _HEADER.unpack_from(blob)
    payload = memoryview(blob)[_HEADER.size :]
    if magic != _MAGIC or len(payload) != n or hashlib.sha256(payload).digest() != digest:
        return None
    try:
        return st_load(bytes(payload))
    except Exception:  # a checksum collision with a bad payload: still a miss
        return None


def chunk_nbytes(chunk: Chunk) -> int:
    return sum(t.nbytes for t in chunk.values())


# ---------------------------------------------------------------------- tiers


class HostTier:
    """Host RAM: chunks as tensors in an LRU dict under a byte budget. With a `device` it is the engine's
    own memory (the "device" tier: chunks kept on the accelerator, loaded without a copy to the host)."""

    def __init__(self, budget: int, device: torch.device | str | None = None):
        self.budget, self.used = budget, 0
        self.device = None if device is None else torch.device(device)
        self.name = "host" if device is None else "device"
        self._data: OrderedDict[str, Chunk] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Chunk | None:
        with self._lock:
            chunk = self._data.get(key)
            if chunk is not None:
                self._data.move_to_end(key)
            return chunk

    def put(self, key: str, chunk: Chunk) -> None:
        n = chunk_nbytes(chunk)
        if n > self.budget:
            return
        if self.device is not None:
            chunk = {k: v.to(self.device) for k, v in chunk.items()}
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return
            while self.used + n > self.budget:
                _, old = self._data.popitem(last=False)
                self.used -= chunk_nbytes(old)
            self._data[key] = chunk
            self.used += n

    def discard(self, key: str) -> None:
        with self._lock:
            chunk = self._data.pop(key, None)
            if chunk is not None:
                self.used -= chunk_nbytes(chunk)

    def stats(self) -> dict:
        with self._lock:
            return dict(tier=self.name, entries=len(self._data), bytes=self.used, budget=self.budget)

    def clear(self) -> int:
        with self._lock:
            n = len(self._data)
            self._data.clear()
            self.used = 0
            return n


class DiskTier:
    """Local disk: one file per chunk (written to a temp file, then renamed), LRU by access time. Several
    processes may share the directory: after each write the tier counts what is on disk (every process's
    files) and evicts the least recently used down to its budget. budget=None (the `kv-store` command):
    never evict."""

    name = "disk"
    suffix = ".kv"
    stale_tmp_s = 3600  # a temp file this old belongs to a writer that died

    def __init__(self, path: str | Path, budget: int | None):
        self.path, self.budget = Path(path), budget
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key → bytes, least recently used first
        self.used = 0
        self._rescan()
        self._evict()

    def _rescan(self) -> None:
        """Count what is on disk now (other processes write here too); drop temp files of dead writers."""
        found, now = [], time.time()
        for f in self.path.glob("*/*"):
            try:
                st = f.stat()
            except OSError:
                continue
            if f.suffix == self.suffix:
                found.append((st.st_mtime, f.stem, st.st_size))
            elif f.name.endswith(".tmp") and now - st.st_mtime > self.stale_tmp_s:
                f.unlink(missing_ok=True)
        with self._lock:
            self._sizes = OrderedDict((key, size) for _, key, size in sorted(found))
            self.used = sum(self._sizes.values())

    def _file(self, key: str) -> Path:
        return self.path / key[:2] / f"{key}{self.suffix}"

    def get(self, key: str) -> Chunk | None:
        f = self._file(key)
        try:
            with open(f, "rb") as fh:
                blob = fh.read()
                inode = os.fstat(fh.fileno()).st_ino
        except OSError:  # missing, unreadable: a miss
            with self._lock:
                self.used -= self._sizes.pop(key, 0)
            return None
        chunk = decode(blob)
        if chunk is None:  # corrupt or torn: drop it (unless a writer has just replaced it), a later put rewrites it
            log.warning("disk tier: %s failed its checksum; dropped", f)
            self._remove(key, inode=inode)
            return None
        with self._lock:
            if key in self._sizes:
                self._sizes.move_to_end(key)
        try:
            os.utime(f)  # the access time other processes evict by
        except OSError:
            pass
        return chunk

    def put(self, key: str, chunk: Chunk) -> None:
        blob = encode(chunk)
        if self.budget is not None and len(blob) > self.budget:
            return
        f = self._file(key)
        f.parent.mkdir(exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, f)  # atomic: a reader sees the old file, the new one, or none — never half
        finally:
            tmp.unlink(missing_ok=True)
        self._rescan()
        self._evict()

    def _remove(self, key: str, inode: int | None = None) -> None:
        f = self._file(key)
        try:
            if inode is None or f.stat().st_ino == inode:
                f.unlink()
        except OSError:
            pass
        with self._lock:
            self.used -= self._sizes.pop(key, 0)

    def _evict(self) -> None:
        while self.budget is not None:
            with self._lock:
                if self.used <= self.budget or not self._sizes:
                    return
                key = next(iter(self._sizes))
            self._remove(key)

    def stats(self) -> dict:
        with self._lock:
            return dict(tier=self.name, entries=len(self._sizes), bytes=self.used, budget=self.budget,
                        path=str(self.path))

    def clear(self) -> int:
        with self._lock:
            keys = list(self._sizes)
        for key in keys:
            self._remove(key)
        return len(keys)


class RedisTier:
    """Redis (redis-py): values with the checksum header under `looplm:kv:<key>`. The Redis server's own
    `maxmemory` + `allkeys-lru` is the budget (set them in redis.conf; `budget` here only refuses single
    values larger than it). When Redis is unreachable every call is a miss; the outage is logged once and
    the connection is retried at most every `retry_s` seconds."""

    name = "redis"
    prefix = "looplm:kv:"

    def __init__(self, url: str, budget: int | None = None, *, timeout_s: float = 0.5, retry_s: float = 1.0):
        import redis  # an optional dependency, imported only when a Redis tier is configured
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url, self.budget, self.retry_s = url, budget, retry_s
        # unreachable: ConnectionError / TimeoutError / OSError mark the tier down; any other Redis error
        # (OOM under noeviction, READONLY, …) is a miss for that call only
        self._down_errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._errors = (redis.RedisError, OSError)
        # no retries inside redis-py: a call that fails is a miss now, and the tier tries again in retry_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_try = 0.0
        self._last_error_log = 0.0

    def _call(self, fn, *args):
        now = time.monotonic()
        with self._lock:
            if self._down_since is not None and now < self._next_try:
                return None
        try:
            out = fn(*args)
        except self._errors as e:
            with self._lock:
                if not isinstance(e, self._down_errors):
                    if now - self._last_error_log > 60:
                        log.warning("redis tier %s: %s (a miss)", self.url, e)
                        self._last_error_log = now
                    return None
                if self._down_since is None:
                    log.warning("redis tier %s is unreachable (%s); serving misses until it is back", self.url, e)
                    self._down_since = now
                self._next_try = now + self.retry_s
            return None
        with self._lock:
            if self._down_since is not None:
                log.warning("redis tier %s is back after %.1f s", self.url, now - self._down_since)
                self._down_since = None
        return out

    @property
    def up(self) -> bool:
        return self._down_since is None

    def get(self, key: str) -> Chunk | None:
        blob = self._call(self.client.get, self.prefix + key)
        chunk = decode(blob)
        if blob is not None and chunk is None:
            log.warning("redis tier: %s failed its checksum; dropped", key)
            self._call(self.client.delete, self.prefix + key)
        return chunk

    def put(self, key: str, chunk: Chunk) -> None:
        if not self.up and time.monotonic() < self._next_try:
            return  # down: not worth encoding
        blob = encode(chunk)
        if self.budget is not None and len(blob) > self.budget:
            return
        self._call(self.client.set, self.prefix + key, blob)

    def stats(self) -> dict:
        keys = self._call(lambda: sum(1 for _ in self.client.scan_iter(match=self.prefix + "*", count=1000)))
        info = self._call(self.client.info, "memory") or {}
        return dict(tier=self.name, url=self.url, up=keys is not None, entries=keys,
                    bytes=info.get("used_memory"), budget=info.get("maxmemory") or self.budget,
                    policy=info.get("maxmemory_policy"))

    def clear(self) -> int:
        keys = self._call(lambda: list(self.client.scan_iter(match=self.prefix + "*", count=1000))) or []
        for a in range(0, len(keys), 512):
            self._call(self.client.delete, *keys[a : a + 512])
        return len(keys)


def parse_tier(spec: str, *, device: torch.device | str = "cpu", admin: bool = False):
    """'device:1GiB' | 'host:4GiB' | 'disk:PATH:20GiB' | 'redis://HOST:PORT[/DB]' (optionally ',SIZE');
    `device` is where a device tier keeps its chunks (the engine's). admin (the `kv-store` command): a disk
    tier is opened without evicting (its size, if given, is ignored: `disk:PATH` is enough)."""
    s = spec.strip()
    if s.startswith(("redis://", "rediss://", "unix://")):
        url, _, size = s.partition(",")
        return RedisTier(url, parse_bytes(size) if size else None)
    kind, _, rest = s.partition(":")
    if kind == "host":
        return HostTier(parse_bytes(rest or "4GiB"))
    if kind == "device":
        return HostTier(parse_bytes(rest or "1GiB"), device=device)
    if kind == "disk":
        if admin:
            path, sep, size = rest.rpartition(":")
            if not sep or not path or not re.fullmatch(r"[0-9.]+[A-Za-z]*", size):
                path = rest
            return DiskTier(path, None)
        path, sep, size = rest.rpartition(":")
        if not sep or not path:
            raise ValueError(f"--kv-store {spec!r}: a disk tier is disk:PATH:SIZE, e.g. disk:/tmp/looplm-kv:20GiB")
        return DiskTier(path, parse_bytes(size))
    raise ValueError(f"--kv-store {spec!r}: expected device:SIZE, host:SIZE, disk:PATH:SIZE or redis://HOST:PORT")


# ---------------------------------------------------------------------- the store


class PrefixStore:
    """Tiers in order (fastest first); `get` reads through them and promotes a hit, `put` writes the first
    tier now and the rest on a background thread (`flush()` waits for it)."""

    def __init__(self, tiers: Iterable, *, chunk_size: int = CHUNK_SIZE, max_pending: int = 256):
        self.tiers = list(tiers)
        if not self.tiers:
            raise ValueError("a PrefixStore needs at least one tier")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer ≥ 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.queries = 0  # chunks looked up
        self.hits = {t.name: 0 for t in self.tiers}
        self._writes: queue.Queue = queue.Queue(maxsize=max_pending)
        self.dropped = 0  # writes dropped because the queue was full (a slow tier)
        self._failing: set[str] = set()  # tiers whose last call raised (logged once)
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_specs(cls, specs: Sequence[str], *, chunk_size: int = CHUNK_SIZE,
                   device: torch.device | str = "cpu", admin: bool = False) -> PrefixStore:
        tiers = [parse_tier(s, device=device, admin=admin) for s in specs]
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"--kv-store: each kind of tier at most once, got {names}")
        return cls(tiers, chunk_size=chunk_size)

    def get(self, key: str) -> tuple[Chunk, str] | None:
        """(chunk, tier name) of the first tier holding `key`, promoted into the tiers before it; or None."""
        with self._lock:
            self.queries += 1
        for i, tier in enumerate(self.tiers):
            try:
                chunk = tier.get(key)
            except Exception as e:  # noqa: BLE001 — a tier that fails is a miss, never a failed request
                if tier.name not in self._failing:
                    log.warning("kv store: reading from the %s tier failed (%s); a miss", tier.name, e)
                    self._failing.add(tier.name)
                continue
            if chunk is not None:
                with self._lock:
                    self.hits[tier.name] += 1
                for faster in self.tiers[:i]:
                    if isinstance(faster, HostTier):
                        faster.put(key, chunk)
                    else:
                        self._queue(faster, key, chunk)
                return chunk, tier.name
        return None

    def put(self, key: str, chunk: Chunk) -> None:
        """Store a chunk (copied: the caller's buffers may change right after)."""
        host = None
        for tier in self.tiers:
            if isinstance(tier, HostTier) and tier.device is not None:
                tier.put(key, {k: v.detach().clone() for k, v in chunk.items()})
                continue
            if host is None:
                host = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in chunk.items()}
            if isinstance(tier, HostTier):
                tier.put(key, host)
            else:
                self._queue(tier, key, host)

    def discard(self, key: str) -> None:
        """Drop `key` from the in-process tiers (an entry that is not what its key promises)."""
        for tier in self.tiers:
            if isinstance(tier, HostTier):
                tier.discard(key)

    def _queue(self, tier, key: str, chunk: Chunk) -> None:
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name="looplm-kv-store", daemon=True)
                self._writer.start()
        try:
            self._writes.put_nowait((tier, key, chunk))
        except queue.Full:  # the slow tier misses this chunk; memory stays bounded
            with self._lock:
                self.dropped += 1

    def _write_loop(self) -> None:
        while True:
            tier, key, chunk = self._writes.get()
            try:
                tier.put(key, chunk)
            except Exception as e:  # a full disk, a permission error: the chunk is just not stored there
                log.warning("kv store: writing %s to the %s tier failed: %s", key, tier.name, e)
            finally:
                self._writes.task_done()

    def flush(self) -> None:
        """Wait until every queued write has reached its tier."""
        self._writes.join()

    def stats(self) -> dict:
        with self._lock:
            out = dict(chunk_size=self.chunk_size, queries=self.queries, hits=dict(self.hits), dropped=self.dropped)
        out["tiers"] = [t.stats() for t in self.tiers]
        return out

    def clear(self) -> dict[str, int]:
        self.flush()
        return {t.name: t.clear() for t in self.tiers}
