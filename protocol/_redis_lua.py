"""Server-side steps of the Redis bus, as Lua scripts run with EVALSHA.

Scripts rather than Redis Functions: a script is sent again on ``NOSCRIPT`` (see
``RedisBus._load_scripts``), so a Redis that restarted empty, or failed over to a replica
without the script cache, needs no separate install step. Every script names all its keys in
KEYS, and the keys of one call share a hash tag, so each call is legal on Cluster.

Each write script takes a batch: ``ARGV`` holds the fixed arguments, then one group of
``width`` arguments per item, and the reply is one string per item. Each item is handled
exactly as if it were sent alone; batching only saves round trips and client-side parsing.
A refused fenced item answers ``LEASELOST <why>``.

Frames are stored in the field ``f``. Dead letters carry ``id`` (the original entry id),
``reason``, ``f``, ``n`` (deliveries) and ``t`` (server time, seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("ACK", "ANNOUNCE", "BURY", "COMMIT", "EXPIRE", "FOLLOW", "FOLLOWERS", "GET_CAPPED", "GET_PREFIX", "LIVE", "PUBLISH", "PUT_STAGED", "RECLAIM", "RELEASE", "RENEW",
           "SET_VALUE", "STAGE_PIECE", "Script")


@dataclass(frozen=True, slots=True)
class Script:
    """A batched script: ``fixed`` leading ARGV entries, then ``width`` per item."""

    name: str
    source: str
    fixed: int
    width: int


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

-- The other groups of a stream (their last-delivered-id does not move during this script).
local function others(key, group)
  local list = {}
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if type(groups) == 'table' and groups.err then return list end
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] ~= group then list[#list + 1] = info end
  end
  return list
end

-- Acknowledge; delete the entry once no group still needs it (passed by all, pending in none),
-- so a stream holds only work waiting or in flight.
local function settle(key, group, id, rest)
  local acked = redis.call('XACK', key, group, id)
  for _, info in ipairs(rest) do
    if id_lt(info['last-delivered-id'], id) then return acked end
    if #redis.call('XPENDING', key, info['name'], id, id, 1) > 0 then return acked end
  end
  redis.call('XDEL', key, id)
  return acked
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

local function bury(key, dead, group, id, reason, frame, n, maxlen, rest)
  local t = redis.call('TIME')
  redis.call('XADD', dead, 'MAXLEN', '~', maxlen, '*', 'id', id, 'reason', reason, 'f', frame, 'n', n,
             't', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
  settle(key, group, id, rest)
end
"""

# KEYS: stream. ARGV: limit (0 = none) | seconds the stream is kept after this write (0 = for ever) | frame.
# The new id, or '' while the stream holds `limit` entries.
PUBLISH = Script("publish", r"""
local limit = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  if limit > 0 and redis.call('XLEN', KEYS[1]) >= limit then
    out[#out + 1] = ''
  else
    out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'f', ARGV[i])
  end
end
if keep > 0 then redis.call('EXPIRE', KEYS[1], keep) end
return out
""", fixed=2, width=1)

# KEYS: tasks, reply stream. ARGV: group | consumer, id, deliveries, frame. The reply's id.
COMMIT = Script("commit", _PRELUDE + r"""
local group, rest, out = ARGV[1], nil, {}
for i = 2, #ARGV, 4 do
  local why = lost(KEYS[1], group, ARGV[i + 1], ARGV[i], ARGV[i + 2])
  if why then
    out[#out + 1] = 'LEASELOST ' .. why
  else
    out[#out + 1] = redis.call('XADD', KEYS[2], '*', 'f', ARGV[i + 3])
    rest = rest or others(KEYS[1], group)
    settle(KEYS[1], group, ARGV[i + 1], rest)
  end
end
return out
""", fixed=1, width=4)

# KEYS: stream. ARGV: group | consumer, id, deliveries. Resets idle time; JUSTID keeps the counter.
RENEW = Script("renew", _PRELUDE + r"""
local out = {}
for i = 2, #ARGV, 3 do
  local why = lost(KEYS[1], ARGV[1], ARGV[i + 1], ARGV[i], ARGV[i + 2])
  if why then
    out[#out + 1] = 'LEASELOST ' .. why
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[i], 0, ARGV[i + 1], 'JUSTID')
    out[#out + 1] = '1'
  end
end
return out
""", fixed=1, width=3)

# KEYS: stream. ARGV: group, idle_ms | consumer, id, deliveries. Marks the entry idle far past any
# lease, so the next reclaim (by any consumer) takes it at once; '0' when no longer owned.
RELEASE = Script("release", _PRELUDE + r"""
local out = {}
for i = 3, #ARGV, 3 do
  if lost(KEYS[1], ARGV[1], ARGV[i + 1], ARGV[i], ARGV[i + 2]) then
    out[#out + 1] = '0'
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[i], 0, ARGV[i + 1], 'IDLE', ARGV[2], 'JUSTID')
    out[#out + 1] = '1'
  end
end
return out
""", fixed=2, width=3)

# KEYS: stream. ARGV: group | id. Unfenced, like MemoryBus.ack.
ACK = Script("ack", _PRELUDE + r"""
local rest, out = others(KEYS[1], ARGV[1]), {}
for i = 2, #ARGV do
  out[#out + 1] = tostring(settle(KEYS[1], ARGV[1], ARGV[i], rest))
end
return out
""", fixed=1, width=1)

# KEYS: stream, dead. ARGV: group, dead maxlen | id, reason, frame, deliveries.
BURY = Script("bury", _PRELUDE + r"""
local rest, out = others(KEYS[1], ARGV[1]), {}
for i = 3, #ARGV, 4 do
  bury(KEYS[1], KEYS[2], ARGV[1], ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[2], rest)
  out[#out + 1] = '1'
end
return out
""", fixed=2, width=4)

# Not batched. KEYS: stream, dead. ARGV: group, consumer, min_idle_ms, count, max_deliveries, dead maxlen.
# Entries idle past the lease: dead-letter those already delivered max_deliveries times, claim
# the others for this consumer (XCLAIM re-checks min-idle and bumps the delivery counter).
# Returns {{id, frame, deliveries}, ...}.
RECLAIM = Script("reclaim", _PRELUDE + r"""
local out = {}
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
local rest = nil
for _, e in ipairs(p) do
  local id, owner, n = e[1], e[2], e[4]
  if n >= tonumber(ARGV[5]) then
    rest = rest or others(KEYS[1], ARGV[1])
    bury(KEYS[1], KEYS[2], ARGV[1], id,
         'delivered ' .. n .. " times without acknowledgement (last consumer '" .. owner .. "')",
         frame_of(KEYS[1], id), n, ARGV[6], rest)
  else
    local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)
    if #c > 0 and c[1] then
      out[#out + 1] = {id, field(c[1][2], 'f'), n + 1}
    end
  end
end
return out
""", fixed=6, width=0)

# Presence: one sorted set per capability, member = worker name, score = when its announcement
# expires (server time, ms), so every client agrees on who is live whatever its own clock says.
ANNOUNCE = Script("announce", r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
""", fixed=2, width=0)

LIVE = Script("live", r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
""", fixed=0, width=0)

# KEYS: follows key. ARGV: member | time to live in ms | the longest a follow may live, in ms. The key outlives
# its longest follow (unlike ``ANNOUNCE``, where every member asks for the same time).
FOLLOW = Script("follow", r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
""", fixed=3, width=0)

# KEYS: follows key. ARGV: most to return | longest time to live in ms. Live follows, newest first; forgets the
# expired ones and any that claim to live longer than a follower may ask (written around ``follow``).
FOLLOWERS = Script("followers", r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. (now + tonumber(ARGV[2])), '+inf')
return redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
""", fixed=2, width=0)

# Plain writes, as scripts so they share the write batcher's round trips and connection (a
# run's summaries and its history's expiry were a tenth of a one-task run's manager time on
# redis-py's own per-command path).
# KEYS: value key. ARGV: time to live in ms (0: none) | value. The last item's value stays.
SET_VALUE = Script("set_value", r"""
local px = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  if px > 0 then redis.call('SET', KEYS[1], ARGV[i], 'PX', px) else redis.call('SET', KEYS[1], ARGV[i]) end
  out[#out + 1] = 1
end
return out
""", fixed=1, width=1)

# A value written in pieces (``RedisBus.put_values_in_parts``) under a staging key of its own, then put in
# place at once, so a reader never sees half of it. Run again after it succeeded (a retried call),
# it finds no staging key and changes nothing.
# KEYS: staging key. ARGV: its time to live in ms | offset | piece. A piece already applied (a retried
# call) is not applied again; a staging key that is not as long as the offset (it expired during an
# outage) is an error starting STAGING, so the writer starts over rather than publish a damaged value.
STAGE_PIECE = Script("stage_piece", r"""
local ms, offset = tonumber(ARGV[1]), tonumber(ARGV[2])
local length = redis.call('STRLEN', KEYS[1])
if length == offset + string.len(ARGV[3]) then return 1 end
if length ~= offset then
  return redis.error_reply('STAGING value lost: ' .. length .. ' bytes staged, ' .. offset .. ' expected')
end
redis.call('SETRANGE', KEYS[1], offset, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ms)
return 1
""", fixed=3, width=0)

# KEYS: staging key, value key. ARGV: time to live in ms (0: none). 1 when moved, else 0.
PUT_STAGED = Script("put_staged", r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
local px = tonumber(ARGV[1])
if px > 0 then redis.call('PEXPIRE', KEYS[2], px) else redis.call('PERSIST', KEYS[2]) end
return 1
""", fixed=1, width=0)

# KEYS: value key. ARGV: the most bytes the reader takes. {} when there is no value, {'TOOLARGE', size} when it
# is longer than that (so a value anyone could have grown is never read whole), else {'OK', value}.
GET_CAPPED = Script("get_capped", r"""
local size = redis.call('STRLEN', KEYS[1])
if size > tonumber(ARGV[1]) then return {'TOOLARGE', size} end
local value = redis.call('GET', KEYS[1])
if not value then return {} end
return {'OK', value}
""", fixed=1, width=0)

# KEYS: value key. ARGV: how many bytes. {} when there is no value, else {its first bytes}.
GET_PREFIX = Script("get_prefix", r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
return {redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)}
""", fixed=1, width=0)

# KEYS: key. ARGV: time to live in seconds, per item. 1 when the key exists, else 0.
EXPIRE = Script("expire", r"""
local out = {}
for i = 1, #ARGV do
  out[#out + 1] = redis.call('EXPIRE', KEYS[1], ARGV[i])
end
return out
""", fixed=0, width=1)

ALL = (PUBLISH, COMMIT, RENEW, RELEASE, ACK, BURY, RECLAIM, ANNOUNCE, LIVE, FOLLOW, FOLLOWERS, SET_VALUE, STAGE_PIECE, PUT_STAGED, GET_CAPPED, GET_PREFIX, EXPIRE)
