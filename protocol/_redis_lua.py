"""Server-side steps of the Redis bus, as Lua scripts run with EVALSHA.

Scripts rather than Redis Functions: redis-py re-sends a script on ``NOSCRIPT`` by itself, so a
Redis that restarted empty (or failed over to a replica without the script cache) needs no
extra load step, and nothing has to be installed before the first call. Every script names all
its keys in KEYS, and the keys of one call share a hash tag, so they are legal on Cluster.

Frames are stored in the field ``f``. Dead letters carry ``id`` (the original entry id),
``reason``, ``f``, ``n`` (deliveries) and ``t`` (server time, seconds).
"""

from __future__ import annotations

__all__ = ("ACK", "BOUNDED_XADD", "BURY", "COMMIT", "RECLAIM", "RELEASE", "RENEW")

_PRELUDE = r"""
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end

-- Why the entry is not (or no longer) owned by this consumer with this delivery count, or false.
local function lost(key, group, id, consumer, deliveries)
  local p = redis.pcall('XPENDING', key, group, id, id, 1)
  if type(p) == 'table' and p.err then return 'its stream or group is gone (' .. p.err .. ')' end
  if #p == 0 then return 'it is no longer pending (acknowledged, dead-lettered or lost)' end
  local e = p[1]
  if e[2] ~= consumer then return 'it was reclaimed by ' .. e[2] end
  if tostring(e[4]) ~= deliveries then return 'it was delivered again (' .. e[4] .. ' deliveries)' end
  return false
end

-- Acknowledge; delete the entry once no group still needs it (passed by all, pending in none),
-- so the stream holds only work in flight.
local function settle(key, group, id)
  redis.call('XACK', key, group, id)
  local groups = redis.call('XINFO', 'GROUPS', key)
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] ~= group then
      if id_lt(info['last-delivered-id'], id) then return 0 end
      if #redis.call('XPENDING', key, info['name'], id, id, 1) > 0 then return 0 end
    end
  end
  redis.call('XDEL', key, id)
  return 1
end

local function field(fields, name)
  if not fields then return '' end
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return ''
end

local function frame_of(key, id)
  local r = redis.call('XRANGE', key, id, id)
  if #r == 0 then return '' end
  return field(r[1][2], 'f')
end

local function bury(key, dead, group, id, reason, frame, n, maxlen)
  local t = redis.call('TIME')
  redis.call('XADD', dead, 'MAXLEN', '~', maxlen, '*', 'id', id, 'reason', reason, 'f', frame, 'n', n,
             't', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
  settle(key, group, id)
end
"""

# KEYS: tasks, reply stream. ARGV: group, consumer, id, deliveries, frame.
COMMIT = _PRELUDE + r"""
local why = lost(KEYS[1], ARGV[1], ARGV[3], ARGV[2], ARGV[4])
if why then return redis.error_reply('LEASELOST ' .. why) end
local new_id = redis.call('XADD', KEYS[2], '*', 'f', ARGV[5])
settle(KEYS[1], ARGV[1], ARGV[3])
return new_id
"""

# KEYS: stream. ARGV: group, consumer, id, deliveries. Resets idle time; JUSTID keeps the counter.
RENEW = _PRELUDE + r"""
local why = lost(KEYS[1], ARGV[1], ARGV[3], ARGV[2], ARGV[4])
if why then return redis.error_reply('LEASELOST ' .. why) end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

# KEYS: stream. ARGV: group, consumer, id, deliveries, idle_ms. Marks the entry idle far past any
# lease, so the next reclaim (of any consumer) takes it at once; a no-op when no longer owned.
RELEASE = _PRELUDE + r"""
if lost(KEYS[1], ARGV[1], ARGV[3], ARGV[2], ARGV[4]) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[5], 'JUSTID')
return 1
"""

# KEYS: stream. ARGV: group, id. Unfenced, like MemoryBus.ack.
ACK = _PRELUDE + r"""
return settle(KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: stream, dead. ARGV: group, id, reason, frame, deliveries, dead maxlen.
BURY = _PRELUDE + r"""
bury(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# KEYS: stream, dead. ARGV: group, consumer, min_idle_ms, count, max_deliveries, dead maxlen.
# Entries idle past the lease: dead-letter those already delivered max_deliveries times, claim
# the others for this consumer (XCLAIM re-checks min-idle and bumps the delivery counter).
# Returns {{id, frame, deliveries}, ...}.
RECLAIM = _PRELUDE + r"""
local out = {}
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
for _, e in ipairs(p) do
  local id, owner, n = e[1], e[2], e[4]
  if n >= tonumber(ARGV[5]) then
    bury(KEYS[1], KEYS[2], ARGV[1], id,
         'delivered ' .. n .. " times without acknowledgement (last consumer '" .. owner .. "')",
         frame_of(KEYS[1], id), n, ARGV[6])
  else
    local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)
    if #c > 0 and c[1] then
      out[#out + 1] = {id, field(c[1][2], 'f'), n + 1}
    end
  end
end
return out
"""

# KEYS: stream. ARGV: maxlen, frame. Returns the new id, or nil when the stream is full.
BOUNDED_XADD = r"""
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'f', ARGV[2])
"""
