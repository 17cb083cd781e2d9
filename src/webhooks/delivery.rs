//! Sending webhook deliveries (placeholder replaced below).
