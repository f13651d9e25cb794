//! The Lua scripts of the Redis engine: each runs atomically in Redis, touches only keys of
//! one channel (one hash tag, so one Redis Cluster slot), and reads the time from Redis.

/// Shared by the two scripts that may need the epoch of a channel without a stream. KEYS[3]:
/// the prefix's base; ARGV[1]: a fresh random value from the calling node (used only when
/// Redis has no base, or cannot say who it is), ARGV[2]: the window (s).
///
/// `new_epoch(t)` is what a stream created now gets, computed from Redis alone, never from
/// anything a node remembers: the hash of the prefix's base (random, made again when Redis
/// lost it: a restart without persistence, `FLUSHALL`), the Redis process's `run_id` (new on
/// every start and on every other server: a restart from an older snapshot, a failover to a
/// replica that lagged), its `evicted_keys` count (an eviction moves it) and the window of
/// `t` (a channel's metadata outlives its last publication by a window, so a stream forgotten
/// by expiry comes back in a later window). Whatever Redis lost, one of them differs, so a
/// recreated stream never gets an epoch an earlier stream had. Where `INFO` is not allowed
/// the epoch is the caller's random value: never reused, and never predicted by a read.
pub(super) const EPOCH_LUA: &str = r#"
local function new_epoch(t)
  local base = redis.call('GET', KEYS[3])
  if not base then
    base = ARGV[1]
    redis.call('SET', KEYS[3], base)
  end
  local function info(section, field)
    local r = redis.pcall('INFO', section)
    if type(r) ~= 'string' then return nil end
    return string.match(r, field .. ':(%w+)')
  end
  local run, evicted = info('server', 'run_id'), info('stats', 'evicted_keys')
  if not run or not evicted then return ARGV[1] end
  local window = string.format('%d', math.floor(tonumber(t[1]) / tonumber(ARGV[2])))
  return string.sub(redis.sha1hex(base .. '\n' .. run .. '\n' .. evicted .. '\n' .. window), 1, 16)
end
"#;

/// KEYS: meta, stream, base. ARGV: fresh random value, window (s), size, history TTL (ms),
/// least meta TTL (ms), body, pub/sub channel, connection to exclude (live only; may be
/// empty). Returns `{epoch, offset}`. Runs after `EPOCH_LUA`.
///
/// Kept to the minimum, since it runs once per publication: `HMGET`, `TIME`, `HINCRBY`,
/// `XADD` (trimmed by size, approximately: whole stream nodes at a time), two `PEXPIRE`s and
/// `PUBLISH`; an `HSET` only when the channel is new or its history policy changed. The
/// epoch is decided here, in the script that creates the stream: two nodes publishing to a
/// new channel at once get one epoch, the first script's. Nothing is trimmed by age here:
/// readers skip entries older than the history TTL (`HISTORY_LUA`), the size bound keeps the
/// stream small, and the whole stream expires one TTL after the last publication.
pub(super) const PUBLISH_LUA: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'e', 'l')
local epoch = m[1]
local policy = ARGV[4] .. ':' .. ARGV[3]
local size = tonumber(ARGV[3])
local life = tonumber(ARGV[4])
local t = redis.call('TIME')
if not epoch then
  epoch = new_epoch(t)
  redis.call('HSET', KEYS[1], 'e', epoch, 'l', policy)
elseif m[2] ~= policy then
  redis.call('HSET', KEYS[1], 'l', policy)
  if size == 0 then redis.call('DEL', KEYS[2]) end
end
local offset = string.format('%d', redis.call('HINCRBY', KEYS[1], 'o', 1))
if size > 0 then
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', size, '0-' .. offset, 'b', ARGV[6], 't', now)
  redis.call('PEXPIRE', KEYS[2], life)
end
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[5]), life))
redis.call('PUBLISH', ARGV[7], 'p' .. offset .. '\n' .. epoch .. '\n' .. ARGV[8] .. '\n' .. ARGV[6])
return {epoch, tonumber(offset)}
"#;

/// KEYS: meta, stream, base. ARGV: fresh random value, window (s), since epoch, since offset
/// (-1: none), limit. Writes nothing of the channel (only the prefix's base, when Redis has
/// none). Returns `{epoch, offset, complete, {{offset, body}...}}`. Runs after `EPOCH_LUA`.
///
/// The stream holds the offsets from its oldest entry to the last one without holes (entries
/// leave from the front only), possibly more than the history size (trimming is approximate)
/// and possibly some past their TTL (publish trims by size only). So the history starts at
/// the first entry that is within both: the last `size` offsets, found by arithmetic, and the
/// TTL, found by a binary search on the entries' times (`O(log size)` lookups).
pub(super) const HISTORY_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since_e, since_o, limit = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local m = redis.call('HMGET', KEYS[1], 'e', 'o', 'l')
if not m[1] then
  local epoch = new_epoch(t)
  local complete = 0
  if since_o == 0 and since_e == epoch then complete = 1 end
  return {epoch, 0, complete, {}}
end
local epoch, top = m[1], tonumber(m[2] or '0')
local policy = m[3] or '0'
local c = string.find(policy, ':', 1, true)
local life, size
if c then
  life, size = tonumber(string.sub(policy, 1, c - 1)), tonumber(string.sub(policy, c + 1))
else
  life, size = tonumber(policy), top
end
local function id(n) return string.format('0-%d', n) end
local function off(e) return tonumber(string.sub(e[1], 3)) end
local first = top + 1
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if oldest and size > 0 then
  local lo, hi = math.max(off(oldest), top - size + 1), top + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local e = redis.call('XRANGE', KEYS[2], id(mid), id(mid))[1]
    if e and tonumber(e[2][4]) + life > now then hi = mid else lo = mid + 1 end
  end
  first = lo
end
local out = {}
local complete = 0
if since_o >= 0 then
  if since_e == epoch and since_o <= top then
    local start = math.max(since_o + 1, first)
    if start <= top and limit > 0 then
      for _, e in ipairs(redis.call('XRANGE', KEYS[2], id(start), '+', 'COUNT', limit)) do
        out[#out + 1] = {off(e), e[2][2]}
      end
    end
    if since_o + 1 >= first and top - since_o <= limit then complete = 1 end
  end
elseif limit > 0 and first <= top then
  local got = redis.call('XREVRANGE', KEYS[2], '+', id(first), 'COUNT', limit)
  for i = #got, 1, -1 do out[#out + 1] = {off(got[i]), got[i][2][2]} end
end
return {epoch, top, complete, out}
"#;

/// Shared by the presence scripts that write. KEYS: entries, expiries, users. Expired entries
/// are removed only by `PRESENCE_EXPIRE_LUA`, which reports who left; reads skip them.
pub(super) const PRESENCE_COMMON_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function userkey(client, v)
  local c = string.find(v, ':', 1, true)
  local n = tonumber(string.sub(v, 1, c - 1))
  if n == 0 then return 'a:' .. client end
  return 'u:' .. string.sub(v, c + 1, c + n)
end
local function drop(client)
  local v = redis.call('HGET', KEYS[1], client)
  redis.call('ZREM', KEYS[2], client)
  if not v then return nil, 0 end
  redis.call('HDEL', KEYS[1], client)
  local uk = userkey(client, v)
  if redis.call('HINCRBY', KEYS[3], uk, -1) <= 0 then
    redis.call('HDEL', KEYS[3], uk)
    return v, 1
  end
  return v, 0
end
"#;

/// ARGV: none. Removes the expired entries; returns `{{client, entry}...}` of those whose
/// user left with them.
pub(super) const PRESENCE_EXPIRE_LUA: &str = r#"
local out = {}
for _, c in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  local v, left = drop(c)
  if v and left == 1 then out[#out + 1] = {c, v} end
end
return out
"#;

/// ARGV: client, entry, TTL (ms). Returns 1 when the user joined.
pub(super) const PRESENCE_ADD_LUA: &str = r#"
local client, v, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now + ttl, client)
local joined = 0
if redis.call('HSETNX', KEYS[1], client, v) == 1 then
  if redis.call('HINCRBY', KEYS[3], userkey(client, v), 1) == 1 then joined = 1 end
end
for i = 1, 3 do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return joined
"#;

/// ARGV: client. Returns `{found, left, entry}`.
pub(super) const PRESENCE_REMOVE_LUA: &str = r#"
local v, left = drop(ARGV[1])
if not v then return {0, 0, ''} end
return {1, left, v}
"#;

/// KEYS: entries, expiries, users. Writes nothing. Returns `{{client, entry}...}` of the
/// entries not expired.
pub(super) const PRESENCE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, c in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. string.format('%d', now), '+inf')) do
  local v = redis.call('HGET', KEYS[1], c)
  if v then out[#out + 1] = {c, v} end
end
return out
"#;
