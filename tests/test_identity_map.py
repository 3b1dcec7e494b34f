"""fp8train.nn.identity_map.WeakIdentityMap: identity keys, entries die with their objects."""

import gc

import pytest
import torch

from fp8train.nn.identity_map import WeakIdentityMap


def test_keys_by_identity_not_equality():
    m = WeakIdentityMap()
    a, b = torch.zeros(3), torch.zeros(3)
    m[a] = "a"
    assert a in m and b not in m and m.get(b) is None and m[a] == "a"
    m[a] = "again"
    assert m.get(a) == "again" and len(m) == 1
    with pytest.raises(KeyError):
        m[b]


def test_entries_die_with_their_objects_and_reused_ids_do_not_match():
    m = WeakIdentityMap()
    a = torch.nn.Parameter(torch.ones(2))
    m[a] = 1
    key = id(a)
    del a
    gc.collect()
    assert len(m) == 0 and key not in m._entries
    # a new object at a stale entry's id is not that entry's key
    c = torch.ones(2)
    m._entries[id(c)] = (lambda: None, "stale")
    assert c not in m and m.get(c, "default") == "default"


def test_items_and_clear():
    m = WeakIdentityMap()
    tensors = [torch.zeros(1) for _ in range(3)]
    for i, t in enumerate(tensors):
        m[t] = i
    assert sorted(v for _, v in m.items()) == [0, 1, 2]
    assert all(m[t] == i for i, t in enumerate(tensors))
    m.clear()
    assert len(m) == 0
