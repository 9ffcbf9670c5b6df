//! Packet views (placeholder until filled in).
