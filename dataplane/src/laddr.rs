//! Local-address allocator (placeholder until filled in).
