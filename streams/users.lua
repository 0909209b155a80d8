-- tagstream state format 3: approximate unique users of one product per window at one event time.
-- KEYS[1] = P:{pid}:doc, whose hash-tagged base names the HyperLogLog keys P:{pid}:uu:<g>:<bucket> (same slot).
-- ARGV = the current 5-minute, hour and day buckets, then, optionally, per window (same order) a count n and n
-- hashed users a batch has not written yet: counted with the window's buckets through the temporary HyperLogLog
-- P:{pid}:uu:batch (same slot), deleted before the script returns. Returns {u_1h, u_24h, u_7d}: PFCOUNT over the
-- buckets each window covers (12, 24 and 7). The client sends ~60 bytes instead of 43 key names (~2.5 KB) per product.
local base = string.sub(KEYS[1], 1, #KEYS[1] - 3)
local batch = base .. 'uu:batch'
local spec = {{'m', 12}, {'h', 24}, {'d', 7}}
local users = {}
local at = 4
for i, g in ipairs(spec) do
  local now = tonumber(ARGV[i])
  local keys = {}
  for b = now - g[2] + 1, now do keys[#keys + 1] = base .. 'uu:' .. g[1] .. ':' .. b end
  local n = 0
  if ARGV[at] then n = tonumber(ARGV[at]) end
  if n > 0 then
    redis.call('DEL', batch)
    for first = at + 1, at + n, 1000 do  -- unpack has a limit of a few thousand values
      redis.call('PFADD', batch, unpack(ARGV, first, math.min(first + 999, at + n)))
    end
    keys[#keys + 1] = batch
  end
  users[i] = redis.call('PFCOUNT', unpack(keys))
  if n > 0 then redis.call('DEL', batch) end
  at = at + 1 + n
end
return users
