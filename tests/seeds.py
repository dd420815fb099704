"""Stable seeds for parametrized tests: the same case gets the same seed in every process (Python's
hash() of a string is randomized per process, so a failure seeded with it would not reproduce).

``stable_seed(*parts)`` is zlib.crc32 of the repr of its parts; every seed handed out during a test
is printed in the report of a failing test (see conftest.py)."""
import zlib

_used = []


def stable_seed(*parts) -> int:
    seed = zlib.crc32(repr(parts).encode()) % 2 ** 31
    _used.append((parts, seed))
    return seed


def take_used():
    """The seeds handed out since the last call."""
    used = list(_used)
    _used.clear()
    return used
