-- Apply a batch of outcome events to the users' packed feature values, atomically (one script).
-- Built and called by service/events/sequences.py (the argument layout is documented there).
--
-- KEYS[1]            the events stream
-- then per event     its dedup key, then the user key of each of its updates
-- ARGV               group (empty: acknowledge nothing, the source is not this stream), dedup ttl (s),
--                    T, T template values (a user's packed value with the
--                    schema defaults, one per namespace), E, then per event: entry id, U, and per
--                    update: template index, byte offset of the sequence, max_len, the item index
--                    as 4 little-endian bytes; then A and A entry ids to acknowledge only.
--
-- An event is applied when SET NX of its dedup key succeeds (else it is a duplicate: skipped). An
-- update prepends the item to the sequence (most recent first) and drops its oldest element. A
-- user without a value gets the namespace's template first; a value of another size or header
-- (corrupt) is left alone. Every entry of the batch is acknowledged (XACK) in the same script, so
-- applying, marking and acknowledging happen together or not at all.
local group = ARGV[1]
local ttl = tonumber(ARGV[2])
local a = 3
local nt = tonumber(ARGV[a]); a = a + 1
local tpl = {}
for t = 1, nt do tpl[t] = ARGV[a]; a = a + 1 end
local ne = tonumber(ARGV[a]); a = a + 1
local k = 2
local ids = {}
local applied, dups, created, corrupt = 0, 0, 0, 0
for _ = 1, ne do
  ids[#ids + 1] = ARGV[a]
  local nu = tonumber(ARGV[a + 1]); a = a + 2
  local fresh = redis.call('SET', KEYS[k], '1', 'NX', 'EX', ttl); k = k + 1
  if fresh then
    applied = applied + 1
    for _ = 1, nu do
      local key, def = KEYS[k], tpl[tonumber(ARGV[a])]
      local off, len, item = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
      k = k + 1; a = a + 4
      local cur = redis.call('GET', key)
      if not cur then
        redis.call('SET', key, def)
        cur = def
        created = created + 1
      end
      if #cur == #def and string.sub(cur, 1, 4) == string.sub(def, 1, 4) then
        redis.call('SETRANGE', key, off, item .. string.sub(cur, off + 1, off + 4 * (len - 1)))
      else
        corrupt = corrupt + 1
      end
    end
  else
    dups = dups + 1
    k = k + nu; a = a + 4 * nu
  end
end
local na = tonumber(ARGV[a]); a = a + 1
for i = 1, na do ids[#ids + 1] = ARGV[a + i - 1] end
if #ids > 0 and group ~= '' then redis.call('XACK', KEYS[1], group, unpack(ids)) end
return {applied, dups, created, corrupt}
