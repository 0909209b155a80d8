-- tagstream state format 1: apply one event's effect to one product's keys, fenced by the event's offset.
-- KEYS[1] = P:{pid}:fence, KEYS[2..n] = the product's other keys the ops name (all share the hash tag {pid}).
-- ARGV[1] = fence field ("<topic>:<partition>" or "sweep"), ARGV[2] = offset (integer, must exceed the stored one),
-- ARGV[3] = emit JSON to keep for re-sending ("" = none), ARGV[4] = ops JSON: a list of
--   ["hset", k, field, value, ...] | ["hincrby", k, field, n] | ["hdel", k, field, ...] | ["set", k, value]
--   | ["del", k] | ["pfadd", k, element]        (k = index into KEYS)
-- Returns {1} when applied, {0, stored_offset, stored_emit_json} when the offset was already applied (a no-op).
local fence = KEYS[1]
local field = ARGV[1]
local offset = tonumber(ARGV[2])
local stored = redis.call('HGET', fence, field)
if stored and tonumber(stored) >= offset then
  return {0, stored, redis.call('HGET', fence, 'emit:' .. field) or ''}
end
local ops = cjson.decode(ARGV[4])
for _, op in ipairs(ops) do
  local name = op[1]
  local key = KEYS[op[2]]
  if name == 'hset' then
    local args = {}
    for i = 3, #op do args[#args + 1] = op[i] end
    redis.call('HSET', key, unpack(args))
  elseif name == 'hincrby' then
    redis.call('HINCRBY', key, op[3], op[4])
  elseif name == 'hdel' then
    local args = {}
    for i = 3, #op do args[#args + 1] = op[i] end
    redis.call('HDEL', key, unpack(args))
  elseif name == 'set' then
    redis.call('SET', key, op[3])
  elseif name == 'del' then
    redis.call('DEL', key)
  elseif name == 'pfadd' then
    redis.call('PFADD', key, op[3])
  else
    return redis.error_reply('tagstream: unknown op ' .. tostring(name))
  end
end
redis.call('HSET', fence, field, ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', fence, 'emit:' .. field, ARGV[3])
end
return {1}
