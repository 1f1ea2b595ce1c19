"""The protocol's constants and hand-built frames: one module for both ends of every link, and no torch in it
(the scheduler and leasing never load torch).

- the op stream: the metadata that names a Stream's session, the command kinds (a command's first tag), the
  field tags and the frames built by hand around large bytes fields (uploads, download chunks: one copy of the
  data instead of protobuf's three);
- the enums whose values travel as strings in scheduler.proto (placement policy, host and lease states).

Values and tensors <-> protobuf are in `gpupool.wire`; statuses and errors in `gpupool.errors`.
"""

from __future__ import annotations

import functools
import struct
from enum import StrEnum
from typing import Any

from gpupool._proto import device_pb2, tensor_pb2

SESSION_METADATA = "gpupool-session"  # metadata of a Stream call: the session (from Attach) it drives
# Metadata of a daemon's Status call: a lease token (as Attach takes) whose lease's sessions the caller may see. A
# Status call may also name sessions by SESSION_METADATA (repeated: one secret session id each); without either, or an
# operator's client certificate, it shows no session (docs/security.md, "Credentials and what they grant").
LEASE_TOKEN_METADATA = "gpupool-lease-token"
# Metadata of a daemon's Status call: a status token (gpupool/tokens.py `mint_status`, handed to an operator by the
# scheduler's ListPool, one a host) that shows every session of that host, where the daemon sees no certificate.
STATUS_TOKEN_METADATA = "gpupool-status-token"

# AttachReply.features: what a daemon supports beyond what every daemon does (docs/wire.md, "Features"). A client
# uses a feature only where the daemon names it; a daemon from before round 24 names none.
# "sdpa_dropout": the fused attention op (`_scaled_dot_product_fused_attention_overrideable` and its backward) with
# dropout_p in (0, 1) (server/attention.py's dropout composition, round 23); without it a daemon refuses such a call
# ("dropout_p must be 0") and the clients take torch's math path for it, with the same bits.
FEATURE_SDPA_DROPOUT = "sdpa_dropout"
# "side_frames": the session's frames may travel on its bulk side socket (hello `BULK_HELLO_FRAMES`, records of kind
# `BULK_FRAME`) instead of its gRPC stream (round 26; docs/wire.md "Frames on the side socket").
FEATURE_SIDE_FRAMES = "side_frames"
# "conv_layout" (round 43): a convolution's output is laid out as on a GPU, channels_last (channels_last_3d) where the
# input or the weight is (gpupool/metas.py `conv_output_format`), not contiguous. Both sides must agree (a view of the
# output is sent with the geometry the client computed), so it is the one feature a client asks for too
# (AttachRequest.features): the daemon applies it to a session only where the client asked and it names it here.
FEATURE_CONV_LAYOUT = "conv_layout"
# "rng_state" (round 43): the `RngState` command, the session generator's state read and loaded
# (torch.cuda.get_rng_state, set_rng_state, torch.random.fork_rng under --cuda); without it a client refuses those
# calls, one RuntimeError.
FEATURE_RNG_STATE = "rng_state"
FEATURES = (FEATURE_SDPA_DROPOUT, FEATURE_SIDE_FRAMES, FEATURE_CONV_LAYOUT, FEATURE_RNG_STATE)
# The largest upload or download chunk (DESIGN.md's wire contract): the worker refuses a larger upload chunk, the
# bulk side channel's reader refuses to read one (an Upload's `bulk_bytes`), clients refuse a larger announcement.
CHUNK_BYTES = 4 * 1024 * 1024
# `gpupool serve --collectives`: encrypted links (server/seclink.py), or plaintext gloo/NCCL (here, not in
# server/collectives.py, which imports torch: the flag is parsed before the zygote starts, server/cli.py).
COLLECTIVE_TRANSPORTS = ("secure", "gloo")
# `gpupool serve --collective-ports`: the TCP ports a session worker granted network binds its collective group's
# listeners in (rank 0's store and secure hub, a rank's store relay) and connects to (those of its peers: the same
# range on every daemon of a pool); under Landlock ABI 4+ the only TCP ports it may bind or connect to (round 42;
# server/landlock.py). Below Linux's default ephemeral range (32768-60999), so no port the kernel hands out (a port-0
# bind, an outgoing connection's own port) lands in it; 256 ports, each group takes one to two on a daemon.
COLLECTIVE_PORTS = (30100, 30355)


def port_range(text: str) -> tuple[int, int]:
    """(LOW, HIGH) of "LOW-HIGH" (or one port "P"), 1024 <= LOW <= HIGH <= 65535 and at most 4096 ports (each is a
    Landlock rule of every network worker); ValueError says what is wrong."""
    low, sep, high = text.strip().partition("-")
    if not low.strip().isdigit() or (sep and not high.strip().isdigit()):
        raise ValueError(f"expected LOW-HIGH (TCP ports), not {text!r}")
    lo, hi = int(low), int(high) if sep else int(low)
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"ports {text!r}: need 1024 <= LOW <= HIGH <= 65535")
    if hi - lo >= 4096:
        raise ValueError(f"ports {text!r}: at most 4096 ports")
    return lo, hi


# The most sessions one daemon holds (`gpupool serve --max-sessions`, each a worker process), and so the most one
# heartbeat names: the scheduler refuses a heartbeat naming more (INVALID_ARGUMENT, before its lock: until round 41 a
# host's 1 MiB heartbeat named ~29,000 lease ids, each looked up under the core's lock).
MAX_HOST_SESSIONS = 4096


class Policy(StrEnum):
    """Placement policy of a lease request (`AllocateRequest.policy`; empty: the scheduler's `--policy`)."""

    BINPACK = "binpack"
    SPREAD = "spread"


class HostState(StrEnum):
    """A daemon host as the scheduler sees it (`Host.state`); a host's devices share its state."""

    UP = "up"
    DOWN = "down"
    DRAINING = "draining"


class LeaseState(StrEnum):
    """A lease's life (`Lease.state`): active until released, expired (not renewed) or lost (its host died)."""

    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    LOST = "lost"


def _number(message: Any, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


# Command kinds: the field number of the member set in a Command's `cmd` oneof, which is a command's first tag.
OP, UPLOAD, GET, FREE, SEED, SYNC = (
    _number(device_pb2.Command, name) for name in ("op", "upload", "get", "free", "seed", "sync")
)


def field_tag(number: int) -> bytes:
    """The tag of a length-delimited field (wire type 2) numbered below 16: one byte."""
    assert 0 < number < 16
    return bytes([(number << 3) | 2])


FRAME_COMMANDS_TAG = field_tag(_number(device_pb2.ClientFrame, "commands"))
_COMMAND_UPLOAD_TAG = field_tag(UPLOAD)
_UPLOAD_DATA_TAG = field_tag(_number(device_pb2.Upload, "data"))
_FRAME_CHUNK_TAG = field_tag(_number(device_pb2.ServerFrame, "chunk"))
_CHUNK_DATA_TAG = field_tag(_number(device_pb2.TensorChunk, "data"))


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def varint(n: int) -> bytes:
    """Protobuf base-128 varint, for frames hand-built around large bytes fields (one copy of the data instead
    of protobuf's three)."""
    if 0 <= n < 0x80:  # lengths and ids of small frames (sync_frame, sync_reply): no loop
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: memoryview | bytes, i: int, end: int) -> tuple[int, int]:
    """(value, next index) of the varint at `i`; raises ValueError past `end` or beyond 64 bits."""
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def upload_head(up: device_pb2.Upload, n: int) -> bytes:
    """The bytes of ClientFrame{commands: [Command{upload: up + data}]} that precede `n` bytes of data (which
    go last: fields may come in any order on the wire)."""
    small = up.SerializeToString()
    data_head = _UPLOAD_DATA_TAG + varint(n)
    upload_len = len(small) + len(data_head) + n
    command_head = _COMMAND_UPLOAD_TAG + varint(upload_len)
    frame_head = FRAME_COMMANDS_TAG + varint(len(command_head) + upload_len)
    return b"".join((frame_head, command_head, small, data_head))


def upload_frame(up: device_pb2.Upload, data: memoryview | bytes) -> bytes:
    """ClientFrame{commands: [Command{upload: up + data}]} serialized with one copy of `data` (protobuf's
    bytes fields would copy it three times)."""
    return b"".join((upload_head(up, len(data)), data))


# ---- the bulk side channel (docs/wire.md): one TLS socket per session next to its stream ----

BULK_HELLO = b"GPBULK1\n"  # then a u16 length and the session id; the daemon answers BULK_OK or an error
BULK_OK = b"\x00"  # an error is b"\x01", a u16 length and a UTF-8 message, then the daemon closes the socket
BULK_UPLOAD, BULK_DOWNLOAD = 1, 2  # the kinds of a transfer's header
BULK_HEAD = struct.Struct("<IQQQ")  # kind, id (an upload's handle, a download's request id), offset, length
# A socket opened with this hello (only where the daemon names FEATURE_SIDE_FRAMES) carries the session's frames
# too: each a record of kind BULK_FRAME (id 0, offset 0, length, then a ClientFrame's or ServerFrame's bytes);
# the daemon ends it with a record of kind BULK_END (id: the gRPC status code's number, length, a UTF-8 reason).
BULK_HELLO_FRAMES = b"GPBULK2\n"
BULK_FRAME, BULK_END = 3, 4
BULK_END_BYTES = 4096  # the longest BULK_END reason: the daemon cuts one to it, a client refuses a longer one


def frame_head(n: int) -> bytes:
    """The BULK_HEAD of a frame of `n` bytes on the side socket (`frame_record` without the frame)."""
    return BULK_HEAD.pack(BULK_FRAME, 0, 0, n)


def frame_record(frame: bytes) -> bytes:
    """A frame as the side socket carries it: its BULK_HEAD (kind BULK_FRAME), then its bytes."""
    return BULK_HEAD.pack(BULK_FRAME, 0, 0, len(frame)) + frame


def bulk_hello(session_id: str, frames: bool = False) -> bytes:
    sid = session_id.encode()
    return (BULK_HELLO_FRAMES if frames else BULK_HELLO) + struct.pack("<H", len(sid)) + sid


def bulk_error(message: str) -> bytes:
    text = message.encode()[:1000]
    return b"\x01" + struct.pack("<H", len(text)) + text


def recv_exact(sock: Any, n: int, closed: str) -> bytes:
    """Exactly `n` bytes from a (TLS) socket, for the bulk hello and its answer; ValueError(`closed`) when the
    peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ValueError(closed)
        buf += part
    return bytes(buf)


class Frame:
    """A serialized frame not yet joined: `head` then `data`, a view of memory that `owner` keeps alive. The
    session worker writes a download's frames this way straight from the tensor into its shared buffer (one
    copy instead of two); `bytes(frame)` joins it."""

    __slots__ = ("data", "head", "owner")

    def __init__(self, head: bytes, data: memoryview, owner: Any) -> None:
        self.head, self.data, self.owner = head, data, owner

    def __len__(self) -> int:
        return len(self.head) + len(self.data)

    def __bytes__(self) -> bytes:
        return b"".join((self.head, self.data))


def chunk_frame(
    head: bytes, chunk: device_pb2.TensorChunk, data: memoryview | bytes, keep: Any = None
) -> bytes | Frame:
    """ServerFrame{head's fields, chunk: chunk + data} serialized with one copy of `data`; `head` is a
    serialized ServerFrame without a reply (its request id). With `keep` (the owner of `data`'s memory), no
    copy yet: a `Frame` for the caller to copy once where it must go."""
    small = chunk.SerializeToString()
    data_head = _CHUNK_DATA_TAG + varint(len(data))
    body_len = len(small) + len(data_head) + len(data)
    prefix = b"".join((head, _FRAME_CHUNK_TAG, varint(body_len), small, data_head))
    if keep is not None:
        return Frame(prefix, memoryview(data), keep)
    return prefix + data


_COMMAND_SYNC_TAG = field_tag(SYNC)
_REPLY_SYNC_TAG = field_tag(_number(device_pb2.ServerFrame, "sync"))
_SYNC_REPLY = _REPLY_SYNC_TAG + b"\x00"


def _request_id(request_id: int) -> bytes:
    """Field 1, `request_id`, as protobuf writes it (nothing for 0): the head of a Sync, and of every ServerFrame."""
    return b"\x08" + varint(request_id) if request_id else b""


def sync_frame(request_id: int) -> bytes:
    """ClientFrame{commands: [Command{sync: Sync{request_id}}]} as protobuf serializes it (a lone Sync)."""
    sync = _request_id(request_id)
    command = _COMMAND_SYNC_TAG + varint(len(sync)) + sync
    return FRAME_COMMANDS_TAG + varint(len(command)) + command


def lone_sync(raw: bytes | memoryview) -> int | None:
    """The request id of a frame that is exactly `sync_frame(request_id)` (what a client's round trip sends:
    one Sync, no scalars), else None; the bytes are compared whole, so no other frame reads as one."""
    if len(raw) > 16 or raw[2:3] != _COMMAND_SYNC_TAG:
        return None
    request_id = shift = 0
    end = 4
    for b in raw[5:] if raw[4:5] == b"\x08" else b"":
        request_id |= (b & 0x7F) << shift
        shift += 7
        end += 1
        if b < 0x80:  # the id's last byte: a lone Sync ends here (the comparison below says whether it did)
            end += 1
            break
    if end != len(raw):  # more after the id (an `.item()`'s scalar handles): no frame to build and compare
        return None
    return request_id if raw == sync_frame(request_id) else None


def sync_reply(request_id: int) -> bytes:
    """ServerFrame{request_id, sync: SyncReply{}} as protobuf serializes it: the answer of an empty Sync."""
    return _request_id(request_id) + _SYNC_REPLY


# SyncReply.values holding one Scalar of 9 bytes: its `f`, a double (wire type 1; in a oneof: 0.0 is written too)
_FLOAT_SCALAR = (
    field_tag(_number(device_pb2.SyncReply, "values")) + b"\x09" + bytes((_number(tensor_pb2.Scalar, "f") << 3 | 1,))
)
_DOUBLE = struct.Struct("<d")


def sync_floats_reply(request_id: int, values: list[float]) -> bytes:
    """ServerFrame{request_id, sync: SyncReply{values: [Scalar{f: v} for v in values]}} as protobuf serializes
    it, built without message objects: the answer of an `.item()` of a float (server/executor.py `_sync`)."""
    if len(values) == 1:  # loss.item()
        body = _FLOAT_SCALAR + _DOUBLE.pack(values[0])
    else:
        body = b"".join([_FLOAT_SCALAR + _DOUBLE.pack(v) for v in values])
    return _request_id(request_id) + _REPLY_SYNC_TAG + varint(len(body)) + body


THP_DEFRAG = "/sys/kernel/mm/transparent_hugepage/defrag"


@functools.cache
def huge_pages_are_cheap(defrag_file: str = THP_DEFRAG) -> bool:
    """Whether asking Linux for transparent huge pages (madvise) under a fresh transfer buffer pays: only when
    its defrag policy never compacts memory in the page fault for madvised regions ("defer" or "never").
    Under the common "madvise" policy (and "always", "defer+madvise") each fault of a fragmented host
    compacts memory first: on the development box that made 256 MiB downloads 2x slower and uploads 1.7x
    slower (BENCHMARKS.md, "wire")."""
    try:
        with open(defrag_file) as f:
            text = f.read()
    except OSError:
        return False
    chosen = text[text.find("[") + 1 : text.find("]")] if "[" in text else ""
    return chosen in ("defer", "never")
