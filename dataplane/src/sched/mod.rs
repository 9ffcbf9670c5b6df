//! Schedulers (placeholder until filled in).
