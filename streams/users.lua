-- tagstream state format 3: approximate unique users of one product per window at one event time.
-- KEYS[1] = P:{pid}:doc, whose hash-tagged base names the HyperLogLog keys P:{pid}:uu:<g>:<bucket> (same slot).
-- ARGV = the current 5-minute, hour and day buckets. Returns {u_1h, u_24h, u_7d}: PFCOUNT over the buckets each
-- window covers (12, 24 and 7). The client sends ~60 bytes instead of 43 key names (~2.5 KB) per product.
local base = string.sub(KEYS[1], 1, #KEYS[1] - 3)
local spec = {{'m', 12}, {'h', 24}, {'d', 7}}
local users = {}
for i, g in ipairs(spec) do
  local now = tonumber(ARGV[i])
  local keys = {}
  for b = now - g[2] + 1, now do keys[#keys + 1] = base .. 'uu:' .. g[1] .. ':' .. b end
  users[i] = redis.call('PFCOUNT', unpack(keys))
end
return users
