"""The compacted ops of one fenced write, and reading Redis replies in either protocol."""

from __future__ import annotations

from typing import Any

from streams.state import Ops, ProductKeys, _pairs

T0 = 1_764_316_800_000  # a 5-minute, hour and day boundary


def test_users_of_a_batch_go_once_into_each_buckets_hyperloglog_and_deletions_run_last() -> None:
    keys = ProductKeys("t", "p1")
    ops = Ops(keys)
    ops.delete(keys.hll("m", T0 // 300_000 - 20))  # a stale bucket pruned earlier in the batch
    for ts, user in [(T0, "a"), (T0 + 1000, "b"), (T0 + 2000, "a"), (T0 + 300_000, "c")]:
        ops.add_user(ts, user)
    ops.counters(keys.beh)["m:1:view"] = 2
    listed = ops.ops
    names = [op[0] for op in listed]
    assert names[-1] == "del" and names.count("pfadd") == 4 and names.index("hincrby") > names.index("pfadd")
    adds = {ops.keys[op[1] - 1]: op[2:] for op in listed if op[0] == "pfadd"}
    m0, m1 = keys.hll("m", T0 // 300_000), keys.hll("m", T0 // 300_000 + 1)
    hour, day = keys.hll("h", T0 // 3_600_000), keys.hll("d", T0 // 86_400_000)
    assert adds == {m0: ["a", "b"], m1: ["c"], hour: ["a", "b", "c"], day: ["a", "b", "c"]}
    assert ops.keys[0] == keys.fence and len(ops.keys) == len(set(ops.keys)) == 7


def test_hash_replies_read_the_same_in_resp2_and_resp3() -> None:
    assert dict(_pairs(["m:1:view", "3", "last_ts", "5"])) == dict(_pairs({"m:1:view": "3", "last_ts": "5"}))
    assert dict(_pairs([])) == {}


def test_a_behaviour_only_products_tags_and_fence_follow_its_counters_only_when_a_time_to_live_can_change() -> None:
    keys = ProductKeys("t", "p")

    def follows(ops: Ops) -> list[list[Any]]:
        return [op for op in ops.ops if op[0] == "pexpire_with_counters"]

    plain = Ops(keys)  # an event inside the product's current 5 minutes: no time to live moves
    plain.counters(keys.beh)["m:1:view"] = 1
    plain.follow_counters()
    assert follows(plain) == []
    for change in (lambda o: o.expire(keys.beh), lambda o: o.set(keys.tags, "{}"), None):
        ops = Ops(keys)
        ops.counters(keys.beh)["m:1:view"] = 1
        if change is None:
            ops.follow_counters(always=True)  # the write makes the fence
        else:
            change(ops)
            ops.follow_counters()
        tags = ops.keys.index(keys.tags) + 1
        assert follows(ops) == [["pexpire_with_counters", tags], ["pexpire_with_counters", 1]]
        assert ops.ops[-2:] == follows(ops)  # after every other step
