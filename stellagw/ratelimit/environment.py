"""The environment tier: one Lua script in Valkey decides for every gateway instance.

Fixed windows aligned on the Valkey server's clock (TIME inside the script, so the clocks
of the gateway hosts do not matter). One EVALSHA per decision checks every rule and counts
the request in all of them, atomically; a denied request is not counted. Keys:

    {<valkey_bucket>:<identity>}:<service>:<route>:<window_s>:<window_index>
    {<valkey_bucket>:<tenant>}/<key>:<service>:<route>:<window_s>:<window_index>
    {<valkey_bucket>:<tenant>}/*:<service>:<route>:<window_s>:<window_index>

The part in braces is the Valkey Cluster hash tag: every counter of one decision lives in
one slot, so one node can run the script. A decision with tenant rules counts the tenant
too, so its tag is the tenant, shared by the identity's counters (second form) and the
tenant's (third form); without tenant rules the tag stays the identity (first form), so
a tenant's identities still spread over the cluster. KEYS are the prefixes up to
<route>; the script derives the full keys from them (in their slot, so Cluster accepts
them). The script's contract is in docs/rate-limiting.md, "The Lua script".
"""
from __future__ import annotations

from ..valkey import Script
from .policy import Check, Policy, escape_tag

__all__ = ["SCRIPT", "LUA", "counter_prefix", "counter_prefixes", "parse_reply"]

LUA = r"""
-- stellagw environment rate limit (docs/rate-limiting.md, "The Lua script").
-- KEYS:    counter prefixes "{bucket:tag}...:service:route", all in one slot
-- ARGV:    limit_1, window_s_1, key_1, limit_2, ...   (all rules must pass; key_i indexes
--          KEYS: the counter family rule i counts in)
-- Returns: {allowed, rule, current, limit, window_s, reset_ms, now_ms, count_1, ...}
--   allowed  1 or 0; a denied request is not counted
--   rule     0-based: on deny the violated rule whose window ends last (the longest
--            Retry-After); when allowed the rule with the fewest requests left
--   current  that rule's count (after this request when allowed)
--   reset_ms ms from now_ms until that rule's window ends (its Retry-After on deny)
--   now_ms   the server's clock, ms since the Unix epoch
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = math.floor(#ARGV / 3)
local keys, counts, limits, windows, ends = {}, {}, {}, {}, {}
local worst, worst_wait = 0, -1
for i = 1, n do
  local limit = tonumber(ARGV[3 * i - 2])
  local w = tonumber(ARGV[3 * i - 1])
  local index = math.floor(now_s / w)
  local key = KEYS[tonumber(ARGV[3 * i])] .. ':' .. w .. ':' .. index
  local count = tonumber(redis.call('GET', key) or '0')
  keys[i], counts[i], limits[i], windows[i] = key, count, limit, w
  ends[i] = (index + 1) * w * 1000
  if count >= limit and ends[i] - now_ms > worst_wait then
    worst, worst_wait = i, ends[i] - now_ms
  end
end
local out
if worst > 0 then
  out = {0, worst - 1, counts[worst], limits[worst], windows[worst], worst_wait, now_ms}
else
  local best, best_left = 1, nil
  local counted = {}
  for i = 1, n do
    -- Rules with the same window share one counter: count the request in it once.
    local count = counted[keys[i]]
    if count == nil then
      count = redis.call('INCR', keys[i])
      counted[keys[i]] = count
      if count == 1 then
        -- A new window: gone a second after it ends (a margin for clock reads in between).
        redis.call('EXPIRE', keys[i], math.ceil((ends[i] - now_ms) / 1000) + 1)
      end
    end
    counts[i] = count
    if best_left == nil or limits[i] - count < best_left then
      best, best_left = i, limits[i] - count
    end
  end
  out = {1, best - 1, counts[best], limits[best], windows[best], ends[best] - now_ms, now_ms}
end
for i = 1, n do out[#out + 1] = counts[i] end
return out
"""

SCRIPT = Script(LUA)


def counter_prefix(bucket: str, identity: str, policy: Policy) -> str:
    """An identity's counter prefix tagged by the identity:
    ``{<bucket>:<identity>}:<service>:<route>``, braces escaped in the tag."""
    return f"{{{escape_tag(bucket)}:{escape_tag(identity)}}}:{policy.target}"


def counter_prefixes(bucket: str, check: Check, identity: str, tenant: str | None,
                     key: str) -> tuple[str, ...]:
    """KEYS for `check`: one prefix per counter family, in the order of its ARGV's key
    indexes. identity = "<tenant>/<key>" (or key without a tenant), tenant escaped as in
    identity; a check with tenant rules is tagged by the tenant, so the identity's prefix
    is the first form's with its closing brace moved to after the tenant."""
    if check.tenant is None:
        return (counter_prefix(bucket, identity, check.identity),)
    tag = f"{{{escape_tag(bucket)}:{escape_tag(tenant)}}}"
    tenant_prefix = f"{tag}/*:{check.tenant.target}"
    if check.identity is None:
        return (tenant_prefix,)
    return (f"{tag}/{escape_tag(key)}:{check.identity.target}", tenant_prefix)


def parse_reply(reply) -> tuple[bool, int, int, int, int, int, int, list[int]]:
    """(allowed, rule, current, limit, window_s, reset_ms, now_ms, counts); ValueError
    when the reply does not have the script's shape.

    Only the length and the seven leading fields are checked: this runs per request, and
    hiredis gives the script's numbers as ints (the counts are not read on that path)."""
    if reply.__class__ is list and len(reply) >= 8:
        allowed, rule, current, limit, window_s, reset_ms, now_ms = reply[:7]
        if int is allowed.__class__ is rule.__class__ is current.__class__ is \
                limit.__class__ is window_s.__class__ is reset_ms.__class__ is now_ms.__class__:
            return allowed == 1, rule, current, limit, window_s, reset_ms, now_ms, reply[7:]
    raise ValueError(f"unexpected rate-limit script reply: {reply!r:.200}")
