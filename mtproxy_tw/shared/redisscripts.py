"""
The Lua scripts of :mod:`~mtproxy_tw.shared.redis`, each run atomically by
the server.

The keys, under the prefix (``mtproxy:``):

``r:HEX``
    a replay key, expiring with the replay window.
``p:COUNTER``
    a plain counter: a hash of host id -> holders on that host.
``m:COUNTER``
    a counter with members: a hash of ``HOST "\\n" MEMBER`` -> holders.
``h:HOST``
    the host's heartbeat, expiring unless refreshed; the fields of a host
    without one are ignored (and deleted) by the next claim.
``k:HOST``
    the set of counter keys the host has fields in (what
    :data:`RECONCILE` rewrites).
``e``
    each host's connection of the moment (an epoch set by
    :data:`RECONCILE`): a claim or release still queued from an older
    connection, whose answer nobody reads, changes nothing.
``u`` and ``s``
    the users' byte totals, and each host's last batch of usage applied
    (a batch sent again after a lost answer is not counted twice).

Scripts reach keys they compute (the heartbeats), so they want one server,
not a cluster.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "RECONCILE", "RELEASE", "USAGE"]

# ARGV: host, prefix, heartbeat ttl (ms), epoch, then per claim (KEYS[i] its
# hash): name, limit (-1: none), member ("" with kind "p"), kind ("p" or "m").
# Answers {refused claim's name or "", 1 if this host's heartbeat was gone},
# or {} for an older epoch.
ACQUIRE = """
local host, prefix, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('HGET', prefix .. 'e', host) ~= ARGV[4] then return {} end
local beat = prefix .. 'h:' .. host
local stale = redis.call('EXISTS', beat) == 0 and 1 or 0
redis.call('SET', beat, '1', 'PX', ttl)
local alive = {}
local function live(h)
  if h == host then return true end
  local a = alive[h]
  if a == nil then
    a = redis.call('EXISTS', prefix .. 'h:' .. h) == 1
    alive[h] = a
  end
  return a
end
local taking, adding = {}, {}
for i = 1, #KEYS do
  local at = 4 + (i - 1) * 4
  local limit, member, kind = tonumber(ARGV[at + 2]), ARGV[at + 3], ARGV[at + 4]
  local key = KEYS[i]
  if limit >= 0 then
    local flat = redis.call('HGETALL', key)
    local count, known, members = taking[key] or 0, false, {}
    for m, _ in pairs(adding[key] or {}) do
      members[m] = true
      count = count + 1
      if m == member then known = true end
    end
    for j = 1, #flat, 2 do
      local field = flat[j]
      local h, m = field, nil
      if kind == 'm' then
        h, m = string.match(field, '^([^\\n]*)\\n(.*)$')
      end
      if h ~= nil and live(h) then
        if kind == 'p' then
          count = count + tonumber(flat[j + 1])
        elseif not members[m] then
          members[m] = true
          count = count + 1
          if m == member then known = true end
        end
      else
        redis.call('HDEL', KEYS[i], field)
      end
    end
    if not known and count >= limit then return {ARGV[at + 1], stale} end
  end
  -- what this call takes counts for its later claims on the same key
  if kind == 'p' then
    taking[key] = (taking[key] or 0) + 1
  else
    adding[key] = adding[key] or {}
    adding[key][member] = true
  end
end
local held = prefix .. 'k:' .. host
for i = 1, #KEYS do
  local at = 4 + (i - 1) * 4
  local field = host
  if ARGV[at + 4] == 'm' then field = host .. '\\n' .. ARGV[at + 3] end
  redis.call('HINCRBY', KEYS[i], field, 1)
  redis.call('SADD', held, KEYS[i])
end
return {'', stale}
"""

# ARGV: host, prefix, epoch, then pairs of (counter key, field) to give one
# holder back each.
RELEASE = """
if redis.call('HGET', ARGV[2] .. 'e', ARGV[1]) ~= ARGV[3] then return 0 end
for i = 4, #ARGV, 2 do
  if redis.call('HINCRBY', ARGV[i], ARGV[i + 1], -1) <= 0 then
    redis.call('HDEL', ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

# ARGV: host, prefix, heartbeat ttl (ms; 0: leave the fleet), epoch, then
# triples (counter key, field, holders): this host's fields become exactly
# these.
RECONCILE = """
local host, prefix, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local held = prefix .. 'k:' .. host
local mine = host .. '\\n'
for _, key in ipairs(redis.call('SMEMBERS', held)) do
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if field == host or string.sub(field, 1, #mine) == mine then
      redis.call('HDEL', key, field)
    end
  end
end
redis.call('DEL', held)
for i = 5, #ARGV, 3 do
  redis.call('HSET', ARGV[i], ARGV[i + 1], ARGV[i + 2])
  redis.call('SADD', held, ARGV[i])
end
if ttl > 0 then
  redis.call('SET', prefix .. 'h:' .. host, '1', 'PX', ttl)
  redis.call('HSET', prefix .. 'e', host, ARGV[4])
else
  redis.call('DEL', prefix .. 'h:' .. host)
  redis.call('HDEL', prefix .. 'e', host)
end
return 1
"""

# KEYS: totals hash, batches hash. ARGV: host, batch id, then pairs
# (user, bytes). Answers every total, flat (user, bytes, ...).
USAGE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
  for i = 3, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""
