-- tagstream state format 3: read one product's state in one call (its behaviour counters, P:{pid}:beh, are read
-- beside it by a plain HGETALL: returning ~100 fields through Lua costs Redis about 4 times as much, and only the
-- product's behaviour partition writes them).
-- KEYS = P:{pid}:doc, P:{pid}:tags, P:{pid}:fence (unique users are counted beside it by users.lua).
-- Returns {JSON {"doc": {}, "fence": {}}, the tags JSON or nil}: the tags JSON as it is stored (not escaped into the
-- other), the fence with its offsets only (its `emit:` fields are read only for redelivered offsets).
local function hash(key, skip)
  local flat = redis.call('HGETALL', key)
  local t = {}
  for i = 1, #flat, 2 do
    if not (skip and string.sub(flat[i], 1, #skip) == skip) then t[flat[i]] = flat[i + 1] end
  end
  return t
end
local out = {doc = hash(KEYS[1]), fence = hash(KEYS[3], 'emit:')}
return {cjson.encode(out), redis.call('GET', KEYS[2])}
