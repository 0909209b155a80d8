-- tagstream state format 3: apply the effect of one or more consecutive events of one partition to one product's
-- keys, fenced by their offsets.
-- KEYS[1] = P:{pid}:fence, KEYS[2..n] = the product's other keys the ops name (all share the hash tag {pid}).
-- ARGV[1] = fence field ("<topic>:<partition>", "sweep:<topic>:<partition>", "retag:<version>"),
-- ARGV[2] = the first offset of the effect (the stored offset must be below it), ARGV[3] = emit JSON to keep for
-- re-sending ("" = keep the stored one), ARGV[4] = ops JSON, ARGV[5] = the last offset (stored as the new fence),
-- ARGV[6] = the product's revision the ops were computed from ("" or absent = any), ARGV[7] = the time to live (ms)
-- of the behaviour keys `pexpire` names (P:{pid}:beh and the HyperLogLogs; "" or 0 = none), ARGV[8] = "1" when the state
-- the ops were computed from had behaviour counters: then P:{pid}:beh must exist (else it expired since) ({2, rev}):
--   ["hincrby", k, field, n, field, n, ...] | ["hset", k, field, value, ...] | ["hdel", k, field, ...]
--   | ["set", k, value] | ["del", k] | ["pfadd", k, element, ...] | ["pexpire", k] | ["pexpire_with_counters", k]
--   | ["persist", k] (k = index into KEYS; PEXPIRE by ARGV[7], nothing when it is 0: the worker names a behaviour key
--   when it makes it, and P:{pid}:beh again each time the product's clock crosses a 5-minute edge;
--   pexpire_with_counters, after every other step (the fence's own write included): the time to live P:{pid}:beh
--   has then (ARGV[7] when it has none), for the tags and the fence of a product no catalog change named, so that
--   they expire with its counters; PERSIST: the fence at the product's first catalog change)
-- Every applied write adds 1 to the fence's `rev` field (absent = 0), so a state read or kept at revision r is
-- current exactly while `rev` is r.
-- Returns {2, rev} when the product's revision is not ARGV[6] (another write came between) or its counters expired
-- (ARGV[8]): nothing applied; else {0, stored_offset, stored_emit_json} when already applied (a no-op), {1, new_rev}
-- when applied.
local fence = KEYS[1]
local beh = string.sub(fence, 1, #fence - 5) .. 'beh'
local field = ARGV[1]
-- The revision is checked first: a write computed from an older revision may cover offsets another writer applied
-- meanwhile (an old owner's batch finishing after a rebalance) and others it did not; only a fresh read can tell
-- which of its events are new, so it is a conflict, never a whole no-op.
local rev = tonumber(redis.call('HGET', fence, 'rev') or '0')
if ARGV[6] and ARGV[6] ~= '' and rev ~= tonumber(ARGV[6]) then
  return {2, rev}
end
local stored = redis.call('HGET', fence, field)
if stored and tonumber(stored) >= tonumber(ARGV[2]) then
  return {0, stored, redis.call('HGET', fence, 'emit:' .. field) or ''}
end
if ARGV[8] == '1' and redis.call('EXISTS', beh) == 0 then
  return {2, rev}
end
local ttl = tonumber(ARGV[7] or '') or 0
local with_counters = {}
for _, op in ipairs(cjson.decode(ARGV[4])) do
  local name = op[1]
  local key = KEYS[op[2]]
  if name == 'hincrby' then
    for i = 3, #op, 2 do redis.call('HINCRBY', key, op[i], op[i + 1]) end
  elseif name == 'hset' then
    redis.call('HSET', key, unpack(op, 3))
  elseif name == 'hdel' then
    redis.call('HDEL', key, unpack(op, 3))
  elseif name == 'set' then
    redis.call('SET', key, op[3])
  elseif name == 'del' then
    redis.call('DEL', key)
  elseif name == 'pfadd' then
    redis.call('PFADD', key, unpack(op, 3))
  elseif name == 'pexpire' then
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  elseif name == 'pexpire_with_counters' then
    with_counters[#with_counters + 1] = key
  elseif name == 'persist' then
    redis.call('PERSIST', key)
  else
    return redis.error_reply('tagstream: unknown op ' .. tostring(name))
  end
end
redis.call('HSET', fence, field, ARGV[5], 'rev', rev + 1)
if ARGV[3] ~= '' then
  redis.call('HSET', fence, 'emit:' .. field, ARGV[3])
end
if ttl > 0 and #with_counters > 0 then
  local left = redis.call('PTTL', beh)
  if left <= 0 then left = ttl end
  for _, key in ipairs(with_counters) do redis.call('PEXPIRE', key, left) end
end
return {1, rev + 1}
