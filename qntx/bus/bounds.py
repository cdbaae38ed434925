"""What a MessagePack body will cost once decoded, checked before it is decoded.

One byte of MessagePack can become a Python object of fifty bytes or more: ``0x90``
is an empty list, ``0x91`` a list of one, ``0xa2 x y`` a short string. A body of
nested or repeated empty arrays would make whoever decodes it allocate sixty times
its size. ``check_decoded_size`` refuses such a body before anything is built:

* a body up to ``SMALL_BODY`` is never a danger, whatever it holds;
* past that, an upper bound from counting the bytes that can start a costly object
  (one pass in C) settles almost every real body;
* only a body the count cannot settle is walked element by element (headers only:
  strings and binary are skipped by their length), stopping at the first excess.

Depth is left to the decoder (msgspec refuses input nested past the interpreter's
recursion limit) and to the owner of the data (the ATS bounds attribute depth).
"""

from __future__ import annotations

import struct

import msgspec

from qntx.errors import TooLarge

SMALL_BODY = 64 << 10
# A body may decode to at most ALLOC_FACTOR times its size, plus ALLOC_FLOOR.
# Generous for real data (short strings cost about twenty times their bytes), tight
# for empty containers (sixty-four).
ALLOC_FACTOR = 24
ALLOC_FLOOR = 1 << 20

# What one element costs once decoded: the parent's pointer to it, plus its object
# (small ints, None, True and False are shared objects: the pointer only).
POINTER = 8
ARRAY = POINTER + 56
MAP = POINTER + 120
BYTES = POINTER + 56  # str, bin, ext: the object's header (its data is in the body too)
NUMBER = POINTER + 32  # a float, or an int past the shared small ones

# Each header byte's kind: array, map, bytes-like, number, or pointer only.
_KIND_COST = {"a": ARRAY, "m": MAP, "s": BYTES, "n": NUMBER, ".": POINTER}


def _kind_of_header(byte: int) -> str:
    if byte in (0xA0, 0xA1):  # "" and one character: shared objects
        return "."
    if 0x90 <= byte <= 0x9F or byte in (0xDC, 0xDD):
        return "a"
    if 0x80 <= byte <= 0x8F or byte in (0xDE, 0xDF):
        return "m"
    if 0xA0 <= byte <= 0xBF or 0xC4 <= byte <= 0xC9 or 0xD4 <= byte <= 0xDB:
        return "s"
    if 0xCA <= byte <= 0xD3:
        return "n"
    return "."


_COST = [_KIND_COST[_kind_of_header(b)] for b in range(256)]
# For the quick bound, two groups, each priced at its dearest kind: deleting every
# byte outside a group and taking the length counts it in one pass of C.
_GROUPS = [
    (max(MAP, ARRAY), bytes(b for b in range(256) if _kind_of_header(b) not in "am")),
    (max(BYTES, NUMBER), bytes(b for b in range(256) if _kind_of_header(b) not in "sn")),
]


def check_decoded_size(body: bytes | msgspec.Raw, what: str = "message") -> None:
    """Raise TooLarge when decoding ``body`` could cost more than its share of memory.
    A malformed body passes: the decoder reports what is wrong with it."""
    size = len(body)
    if size <= SMALL_BODY:
        return
    if not isinstance(body, bytes):
        body = bytes(body)  # a Raw payload: one copy, only past SMALL_BODY
    limit = ALLOC_FACTOR * size + ALLOC_FLOOR
    # Every element starts with one header byte, so counting every byte that could be
    # a header of each kind bounds the cost from above (bytes inside strings only add).
    bound = POINTER * size + sum(
        (cost - POINTER) * len(body.translate(None, others)) for cost, others in _GROUPS
    )
    if bound <= limit:
        return
    cost = _walk(memoryview(body), limit)
    if cost > limit:
        raise TooLarge(
            f"{what} of {size} bytes would decode to more than {limit} bytes "
            f"({ALLOC_FACTOR} times its size): too many small objects"
        )


# Header byte -> (bytes of length field, fixed payload bytes) for the skipping walk.
_LEN = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXED = {
    0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}  # fmt: skip
_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")


def _walk(view: memoryview, limit: int) -> int:
    """The decoded cost of the elements in ``view``, walked header by header, stopping
    once it passes ``limit`` or the body ends (malformed input stops the walk early)."""
    cost, pos, end = 0, 0, len(view)
    pending = 1  # elements still to read; containers add theirs
    while pending and pos < end and cost <= limit:
        pending -= 1
        byte = view[pos]
        pos += 1
        cost += _COST[byte]
        if byte <= 0x7F or byte >= 0xE0 or byte in (0xC0, 0xC2, 0xC3):
            continue
        if 0x80 <= byte <= 0x8F:
            pending += 2 * (byte & 0x0F)
        elif 0x90 <= byte <= 0x9F:
            pending += byte & 0x0F
        elif 0xA0 <= byte <= 0xBF:
            pos += byte & 0x1F
        elif byte in (0xDC, 0xDE):
            n = _U16.unpack_from(view, pos)[0] if pos + 2 <= end else 0
            pos += 2
            pending += n * (2 if byte == 0xDE else 1)
        elif byte in (0xDD, 0xDF):
            n = _U32.unpack_from(view, pos)[0] if pos + 4 <= end else 0
            pos += 4
            pending += n * (2 if byte == 0xDF else 1)
        elif byte in _LEN:
            width = _LEN[byte]
            n = int.from_bytes(view[pos : pos + width]) if pos + width <= end else 0
            pos += width + n + (1 if byte in (0xC7, 0xC8, 0xC9) else 0)  # ext: its type byte
        elif byte in _FIXED:
            pos += _FIXED[byte]
    return cost
