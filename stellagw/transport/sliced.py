"""A large JSON control payload (HELLO, ENDPOINTS_UPDATE) decoded a slice at a time.

One orjson.loads of a 16 MB ENDPOINTS_UPDATE held the worker's event loop 0.4–1.5 s, every
client of the worker waiting (an adversarial probe, docs/security.md §3d). A worker thread
does not help: orjson, like json's C scanner, holds the GIL for the whole call, so the loop
waits just as long. So the payload is parsed in pieces: json's C scanner (`scan_once`: one
value, and where it ends) runs on at most SLAB characters at a time, a container too large
for one piece is opened and its members parsed the same way, and the caller runs step()
from the loop with a time budget, other callbacks in between.

The result is what orjson.loads gives, and what it refuses is refused (DecodeError): NaN
and Infinity, lone surrogate escapes, invalid UTF-8, nesting past 1024; an integer past 64
bits is a float, as orjson reads it. A document whose shape would make the slicing cost
more than a few times a plain parse (containers just larger than a slab, nested deep) is
refused too: no service sends
one. For the registration budget (TransportHub.admit_registration) it also gives a digest of
the raw `endpoints` and `schemas` members, hashed a slice at a time as well.
"""
from __future__ import annotations

import hashlib
import json
import re
from time import perf_counter

import orjson

SLAB = 16 * 1024            # characters one C call parses at most (~2 ms for the densest JSON)
MAX_DEPTH = 1024            # orjson's nesting limit
HASH_SLICE = 1024 * 1024    # bytes of the digest hashed per step
_CHECK_EVERY = 64           # values parsed between two looks at the clock

_WS = re.compile(r"[ \t\n\r]*")
_WS_B = re.compile(rb"[ \t\n\r]*")
_STRING_BODY = re.compile(rb'(?:[^"\\]++|\\.)*+')
_NUMBER_REST = re.compile(r"[0-9.eE+\-]*")
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_DIGESTED = ("endpoints", "schemas")


class DecodeError(ValueError):
    pass


def _constant(name):
    raise ValueError(f"{name} is not JSON")


def _float(text):
    value = float(text)
    if value == _INF or value == -_INF:
        # orjson refuses a number past a double's range (1e999); json's scanner gives inf.
        raise ValueError("number is infinity when parsed as double")
    return value


def _int(text):
    value = int(text)
    if len(text) > 18 and not -(1 << 63) <= value < (1 << 64):
        return _float(text)         # as orjson reads an integer past 64 bits
    return value


_INF = float("inf")
_scan_once = json.decoder.JSONDecoder(parse_constant=_constant, parse_int=_int,
                                      parse_float=_float).scan_once

# What the innermost open container expects next.
_VALUE, _KEY, _COLON, _AFTER = 0, 1, 2, 3


class SlicedJson:
    """`step(deadline)` until it returns True; then `result` (a dict) and `digest`."""

    def __init__(self, data):
        self._data = data                   # bytes-like, not changed until done
        self._size = len(data)
        self._stack = []                    # [container, key (objects), byte start]
        self._expect = _VALUE
        self._key = None
        self._work = 0                      # characters parsed in attempts that failed
        self._spans = {}                    # top-level member -> (byte start, byte end)
        self._fresh = False                 # the innermost container was just opened
        self._hash = None
        self._hashing = []                  # (start, end) still to hash
        self.result = None
        self.digest = None
        # An empty slab before the first: step() reads the first one (and raises its errors).
        self._base, self._text, self._j, self._ascii, self._tail = 0, "", 0, True, False

    # ------------------------------------------------------------------ slabs

    def _slab(self, pos):
        """Parse on from byte `pos`: the next SLAB characters' worth, cut at a character."""
        data = self._data
        cut = min(self._size, pos + SLAB)
        while cut < self._size and cut > pos and data[cut] & 0xC0 == 0x80:
            cut -= 1
        try:
            text = bytes(data[pos:cut]).decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"str is not valid UTF-8 at byte {pos + exc.start}") from None
        self._base, self._text, self._j = pos, text, 0
        self._ascii = text.isascii()
        self._tail = cut == self._size

    def _offset(self, j):
        """The byte offset of character `j` of the slab."""
        return self._base + (j if self._ascii else len(self._text[:j].encode()))

    def _reslab(self, j):
        self._check_surrogates(j)
        self._slab(self._offset(j))

    def _check_surrogates(self, end):
        """orjson refuses a lone surrogate escape, which json's scanner takes: in what was
        parsed of this slab, every high one is followed by a low one and the other way round."""
        text = self._text
        for m in _SURROGATE.finditer(text, 0, end):
            i = m.start()
            k = i
            while k > 0 and text[k - 1] == "\\":
                k -= 1
            if (i - k) % 2:
                continue                    # "\\uD800": a backslash, then text
            high = m.group()[3] in "89aAbB"
            if high:
                pair = _SURROGATE.match(text, i + 6, end)
                if pair is not None and pair.group()[3] not in "89aAbB":
                    continue
            else:
                pair = _SURROGATE.match(text, i - 6, i) if i >= 6 else None
                if pair is not None and pair.group()[3] in "89aAbB":
                    continue
            raise DecodeError("lone surrogate in a \\u escape")

    # ------------------------------------------------------------------ parsing

    def step(self, deadline):
        """Parse until `deadline` (perf_counter) passes; True when the result is ready."""
        try:
            while self.result is None or self._hashing:
                if self._hashing:
                    self._hash_slice()
                else:
                    self._advance()
                if perf_counter() >= deadline:
                    return self.result is not None and not self._hashing
        except DecodeError:
            raise
        except (RecursionError, ValueError) as exc:
            raise DecodeError(str(exc) or exc.__class__.__name__) from None
        return True

    def _advance(self):
        """One piece of work: a run of members of the innermost container (at most
        _CHECK_EVERY, within the slab), or its punctuation."""
        text = self._text
        j = _WS.match(text, self._j).end()
        if j >= len(text):
            if self._tail:
                raise DecodeError("unexpected end of data")
            self._reslab(j)
            return
        expect = self._expect
        stack = self._stack
        if stack:
            top = stack[-1]
            is_dict = top[0].__class__ is dict
            if (expect != _AFTER and self._fresh and expect != _COLON
                    and text[j] == ("}" if is_dict else "]")):
                expect = _AFTER             # opened because it was large, yet empty
        if expect == _AFTER:
            if not stack:
                raise DecodeError("unexpected content after document")
            c = text[j]
            if c == ",":
                self._j = j + 1
                self._expect = _KEY if is_dict else _VALUE
                self._fresh = False
                return
            if c == ("}" if is_dict else "]"):
                self._j = j + 1
                stack.pop()
                self._fresh = False
                self._store(top[0], top[1], top[2], self._offset(j + 1))
                return
            raise DecodeError(f"expected ',' or the end of a container at byte {self._offset(j)}")
        if expect == _COLON:
            if text[j] != ":":
                raise DecodeError(f"expected ':' at byte {self._offset(j)}")
            self._j = j + 1
            self._expect = _VALUE
            return
        if expect == _KEY and text[j] != '"':
            raise DecodeError(f"expected a key at byte {self._offset(j)}")
        # A run of members of the innermost container, while they fit in the slab.
        scan = _scan_once
        n = 0
        while True:
            try:
                value, end = scan(text, j)
            except (StopIteration, ValueError, RecursionError) as exc:
                # Not necessarily at `j`: json's scanner raises StopIteration for a value
                # missing anywhere inside, as a slab cut in the middle of one leaves it.
                self._expect = expect
                if self._tail:
                    if exc.__class__ is StopIteration:
                        raise DecodeError(f"expected a value at byte {self._offset(j)}") from None
                    raise
                self._work += len(text) - j
                if self._work > 8 * self._size + 1024 * SLAB:
                    raise DecodeError("too costly to decode in slices") from None
                if j > 0:
                    self._reslab(j)         # the value starts the next slab
                else:
                    self._open(expect)      # larger than a slab
                return
            if (not self._tail and text[j] not in '"[{tfn'
                    and _NUMBER_REST.fullmatch(text, end) is not None):
                # A number the slab may have cut ("12" of "123", "1" of "1.5"): parsed
                # again from the next one.
                self._expect = expect
                if j == 0:
                    raise DecodeError(f"number longer than {SLAB} characters")
                self._reslab(j)
                return
            self._fresh = False
            if expect == _KEY:
                if value.__class__ is not str:
                    raise DecodeError(f"expected a key at byte {self._offset(j)}")
                self._key = value
                j = _WS.match(text, end).end()
                if j < len(text) and text[j] == ":":
                    j = _WS.match(text, j + 1).end()
                    if j < len(text):
                        expect = _VALUE
                        continue
                    self._j, self._expect = j, _VALUE
                    return
                self._j, self._expect = j, _COLON
                return
            if not stack:
                self._j = end
                self._store(value, None, self._offset(j), self._offset(end))
                return
            if is_dict:
                top[0][self._key] = value
            else:
                top[0].append(value)
            if len(stack) == 1:
                self._record(self._key, self._offset(j), self._offset(end))
            j = _WS.match(text, end).end()
            n += 1
            if j < len(text) and text[j] == "," and n < _CHECK_EVERY:
                j = _WS.match(text, j + 1).end()
                expect = _KEY if is_dict else _VALUE
                if j < len(text):
                    continue
                self._j, self._expect = j, expect
                return
            self._j, self._expect = j, _AFTER
            return

    def _open(self, expect):
        """The value at the start of the slab is larger than the slab: a container is opened
        and parsed member by member, a string read whole (one C call, copying speed)."""
        c = self._text[0]
        start = self._base
        if c == "{" or c == "[":
            if expect == _KEY:
                raise DecodeError(f"expected a key at byte {start}")
            if len(self._stack) >= MAX_DEPTH:
                raise DecodeError("recursion limit reached")
            self._stack.append([{} if c == "{" else [], self._key, start])
            self._j = 1
            self._fresh = True
            self._expect = _KEY if c == "{" else _VALUE
            return
        if c != '"':
            raise DecodeError(f"invalid value at byte {start}")
        data = self._data
        pos = start + 1
        while True:
            end = _STRING_BODY.match(data, pos, min(self._size, pos + SLAB)).end()
            if end < self._size and data[end] == 0x22:          # the closing quote
                break
            if end >= self._size:
                raise DecodeError("unterminated string")
            pos = end if end > pos else pos + 1
        try:
            value = orjson.loads(data[start:end + 1])
        except orjson.JSONDecodeError as exc:
            raise DecodeError(str(exc)) from None
        self._slab(end + 1)
        if expect == _KEY:
            self._key = value
            self._expect = _COLON
            return
        self._store(value, self._key, start, end + 1)

    def _store(self, value, key, start, end):
        """A value opened or read whole is complete (bytes start..end): into the container
        it is a member of (`key` in an object), or the result."""
        stack = self._stack
        self._expect = _AFTER
        if not stack:
            if value.__class__ is not dict:
                raise DecodeError("control payload is not a JSON object")
            self._check_surrogates(self._j)
            if _WS_B.match(self._data, end).end() != self._size:
                raise DecodeError("unexpected content after document")
            self.result = value
            self._start_hash()
            return
        container = stack[-1][0]
        if container.__class__ is dict:
            container[key] = value
        else:
            container.append(value)
        if len(stack) == 1:
            self._record(key, start, end)

    def _record(self, key, start, end):
        if key in _DIGESTED:
            self._spans[key] = (start, end)

    # ------------------------------------------------------------------ digest

    def _start_hash(self):
        """The digest of the raw `endpoints` and `schemas` members, each length-prefixed."""
        self._hash = hashlib.blake2b(digest_size=16)
        for key in _DIGESTED:
            start, end = self._spans.get(key, (0, -1))
            self._hash.update(b"%d:" % (end - start))
            if end > start:
                self._hashing.append((start, end))
        if not self._hashing:
            self.digest = self._hash.digest()

    def _hash_slice(self):
        start, end = self._hashing[0]
        upto = min(end, start + HASH_SLICE)
        self._hash.update(self._data[start:upto])
        if upto >= end:
            del self._hashing[0]
        else:
            self._hashing[0] = (upto, end)
        if not self._hashing:
            self.digest = self._hash.digest()
