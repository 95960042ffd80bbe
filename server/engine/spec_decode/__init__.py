"""Speculative decoding: proposers (n-gram prompt lookup, a draft model), the rejection sampler that
verifies their tokens against the target, and the counters /metrics reports."""
