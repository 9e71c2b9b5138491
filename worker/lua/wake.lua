-- WAKE: ring wake lists, so that idle workers blocked on them claim at once.
-- KEYS[1..n] wake  P:wake:<q>  one per queue
-- ARGV: none.
-- Reply: nil.
-- Invariants: one token at most per list (a wake list is a doorbell, not a counter); a list of the wrong type is
--   skipped (pcall), never an error after an earlier list was rung.
for _, wake_key in ipairs(KEYS) do ring(wake_key) end
