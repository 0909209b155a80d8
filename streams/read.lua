-- tagstream state format 3: read one product's state in one call (its behaviour counters, P:{pid}:beh, are read
-- beside it by a plain HGETALL: returning ~100 fields through Lua costs Redis about 4 times as much, and only the
-- product's behaviour partition writes them).
-- KEYS = P:{pid}:doc, P:{pid}:tags, P:{pid}:fence. The HyperLogLog keys P:{pid}:uu:<g>:<bucket> are named from
-- KEYS[1]'s hash-tagged base (same slot). ARGV = the current 5-minute, hour and day buckets, or none.
-- Returns {JSON {"doc": {}, "fence": {}, "users": [u_1h, u_24h, u_7d]}, the tags JSON or nil}: the tags JSON as it
-- is stored (not escaped into the other), the fence with its offsets only (its `emit:` fields are read only for
-- redelivered offsets).
local function hash(key, skip)
  local flat = redis.call('HGETALL', key)
  local t = {}
  for i = 1, #flat, 2 do
    if not (skip and string.sub(flat[i], 1, #skip) == skip) then t[flat[i]] = flat[i + 1] end
  end
  return t
end
local out = {doc = hash(KEYS[1]), fence = hash(KEYS[3], 'emit:')}
local users = {0, 0, 0}
if #ARGV == 3 then
  local base = string.sub(KEYS[1], 1, #KEYS[1] - 3)
  local spec = {{'m', 12}, {'h', 24}, {'d', 7}}
  for i, g in ipairs(spec) do
    local now = tonumber(ARGV[i])
    local keys = {}
    for b = now - g[2] + 1, now do keys[#keys + 1] = base .. 'uu:' .. g[1] .. ':' .. b end
    users[i] = redis.call('PFCOUNT', unpack(keys))
  end
end
out.users = users
return {cjson.encode(out), redis.call('GET', KEYS[2])}
